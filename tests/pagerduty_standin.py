"""A local HTTP stand-in of PagerDuty's Events API v2 that records each event it gets
and answers 202 as PagerDuty does (or `status` on demand)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest

from tests.slack_standin import serving


class PagerDutyStandIn:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.status = 202
        self.url = ""


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        stand_in: PagerDutyStandIn = self.server.stand_in
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        stand_in.events.append({"path": self.path, "body": body})
        reply = json.dumps({"status": "success", "message": "Event processed",
                            "dedup_key": body.get("dedup_key")} if stand_in.status == 202 else
                           {"status": "invalid event", "message": "Event object is invalid"}).encode()
        self.send_response(stand_in.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def pagerduty() -> Iterator[PagerDutyStandIn]:
    stand_in = PagerDutyStandIn()
    with serving(_Handler, stand_in) as port:
        stand_in.url = f"http://127.0.0.1:{port}/v2/enqueue"
        yield stand_in
