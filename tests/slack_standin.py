"""A local HTTP stand-in of the Slack Web API that records what it received.

The stand-in is a ThreadingHTTPServer on 127.0.0.1 that records every request
(path, headers, parsed body) and answers like Slack, or fails on demand.
"""

from __future__ import annotations

import email
import email.policy
import json
import threading
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
        self.reply: dict[str, Any] | str = OK_REPLY
        self.hang = False  # hold the answer until `release` is set (client timeout)
        self.release = threading.Event()
        self.url = ""
        self._lock = threading.Lock()

    def record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(entry)


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
        stand_in.record({
            "path": self.path,
            "headers": dict(self.headers.items()),
            "body": _parse_body(self.headers.get("Content-Type", ""), raw),
        })
        if stand_in.hang:
            stand_in.release.wait(timeout=10)
        reply = stand_in.reply
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


@pytest.fixture
def slack(_no_proxy: None) -> Any:
    stand_in = SlackStandIn()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.stand_in = stand_in  # type: ignore[attr-defined]
    stand_in.url = f"http://127.0.0.1:{server.server_address[1]}/api/"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield stand_in
    stand_in.release.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


