"""A local HTTP stand-in of the Slack Web API that records what it received.

The stand-in is a ThreadingHTTPServer on 127.0.0.1 that records every request
(path, headers, parsed body) and answers like Slack for the methods we call
(chat.postMessage; conversations.create, .list and .invite, keeping the channels it
made), or fails on demand (`reply`, `status`, `fail_methods`).
"""

from __future__ import annotations

import email
import email.policy
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import pytest

OK_REPLY = {"ok": True, "channel": "C1", "ts": "1.2"}


class SlackStandIn:
    """What the fake Slack saw and how it should answer."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.reply: dict[str, Any] | str | None = None  # None: answer as Slack would
        self.fail_methods: dict[str, str] = {}  # method -> Slack error it answers with
        self.channels: dict[str, str] = {}  # name -> id
        self.hang = False  # hold the answer until `release` is set (client timeout)
        self.release = threading.Event()
        self.url = ""
        self._lock = threading.Lock()

    def record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(entry)

    def calls(self, method: str) -> list[dict[str, Any]]:
        """The bodies of the requests to one Web API method, in order."""
        return [r["body"] for r in self.requests if r["path"].endswith("/" + method)]

    def answer(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        if method in self.fail_methods:
            return {"ok": False, "error": self.fail_methods[method]}
        with self._lock:
            if method == "conversations.create":
                name = body.get("name", "")
                if name in self.channels:
                    return {"ok": False, "error": "name_taken"}
                self.channels[name] = f"C{len(self.channels) + 100}"
                return {"ok": True, "channel": {"id": self.channels[name], "name": name}}
            if method == "conversations.list":
                return {"ok": True, "channels": [{"id": i, "name": n} for n, i in self.channels.items()],
                        "response_metadata": {"next_cursor": ""}}
        if method == "conversations.invite":
            return {"ok": True, "channel": {"id": body.get("channel")}}
        return dict(OK_REPLY, channel=body.get("channel", "C1"))


def _parse_body(content_type: str, raw: bytes) -> dict[str, Any]:
    """chat.postMessage arrives as JSON; other SDK paths use url-encoded or multipart forms."""
    if content_type.startswith("application/json"):
        return json.loads(raw)
    if content_type.startswith("application/x-www-form-urlencoded"):
        body: dict[str, Any] = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
    elif content_type.startswith("multipart/form-data"):
        msg = email.message_from_bytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw, policy=email.policy.HTTP
        )
        body = {part.get_param("name", header="content-disposition"): part.get_content()
                for part in msg.iter_parts()}
    else:
        raise AssertionError(f"unexpected Content-Type {content_type!r}")
    if isinstance(body.get("blocks"), str):  # forms carry blocks as a JSON string
        body["blocks"] = json.loads(body["blocks"])
    return body


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        stand_in: SlackStandIn = self.server.stand_in
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = _parse_body(self.headers.get("Content-Type", ""), raw)
        stand_in.record({"path": self.path, "headers": dict(self.headers.items()), "body": body})
        if stand_in.hang:
            stand_in.release.wait(timeout=10)
        reply = stand_in.reply if stand_in.reply is not None else stand_in.answer(self.path.rsplit("/", 1)[-1], body)
        data = (reply if isinstance(reply, str) else json.dumps(reply)).encode()
        try:
            self.send_response(stand_in.status)
            self.send_header("Content-Type",
                             "text/plain" if isinstance(reply, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # client gave up (timeout test)
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output clean
        pass


@pytest.fixture
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """slack_sdk honours HTTP(S)_PROXY but not NO_PROXY; loopback must be reached directly."""
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler], stand_in: Any) -> Iterator[int]:
    """`handler` on a free loopback port (`server.stand_in` is `stand_in`) for the block;
    yields the port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.stand_in = stand_in  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        release = getattr(stand_in, "release", None)
        if release is not None:
            release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def running_standin() -> Iterator[SlackStandIn]:
    """The Slack stand-in on a free loopback port, for as long as the block runs."""
    stand_in = SlackStandIn()
    with serving(_Handler, stand_in) as port:
        stand_in.url = f"http://127.0.0.1:{port}/api/"
        yield stand_in


@pytest.fixture
def slack(_no_proxy: None) -> Iterator[SlackStandIn]:
    with running_standin() as stand_in:
        yield stand_in
