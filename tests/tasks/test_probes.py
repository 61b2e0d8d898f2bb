"""Probes against a real HTTP server on loopback that answers like the reference service
(or hangs, or refuses), switched per test."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks.probes import ProbeKind, ServiceNotReady, probe, wait_until_ready
from tests.conftest import free_port

HEALTHY = {
    "/health": (200, {"status": "healthy", "timestamp": 1706794800, "uptime_seconds": 3600}),
    "/ready": (200, {"ready": True, "database_connected": True, "cache_available": True, "reason": None}),
    "/live": (200, {"alive": True, "pid": 42157, "response_time_ms": 1}),
}
NOT_READY = (503, {"ready": False, "database_connected": False, "cache_available": True,
                   "reason": "Database unavailable"})


@pytest.fixture
def service():
    """A stand-in target whose answers (or silence) each test chooses."""
    answers = dict(HEALTHY)
    state = {"hang": 0.0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            if state["hang"]:
                time.sleep(state["hang"])
            status, body = answers.get(self.path, (404, {"error": "no such endpoint"}))
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.answers, server.state = answers, state  # type: ignore[attr-defined]
    server.url = f"http://127.0.0.1:{server.server_port}"  # type: ignore[attr-defined]
    yield server
    state["hang"] = 0.0
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("kind", list(ProbeKind))
def test_healthy_service(service, kind):
    result = probe(service.url, kind)
    assert result.ok and result.status_code == 200 and result.reason is None
    assert result.body == HEALTHY[f"/{kind.value}"][1] and result.latency_ms > 0


def test_not_ready_gives_the_services_reason(service):
    service.answers["/ready"] = NOT_READY
    result = probe(service.url, ProbeKind.READY)
    assert not result.ok and result.status_code == 503 and result.reason == "Database unavailable"


@pytest.mark.parametrize("answer, reason", [
    ((500, "<html>oops</html>"), "HTTP 500"),
    ((200, {"status": "degraded"}), "answered without status='healthy'"),
    ((200, "not json"), "answered without status='healthy'"),
])
def test_unhealthy_answers(service, answer, reason):
    service.answers["/health"] = answer
    result = probe(service.url, ProbeKind.HEALTH)
    assert not result.ok and result.reason == reason


def test_a_hanging_service_is_bounded_by_the_timeout(service):
    service.state["hang"] = 30
    result = probe(service.url, ProbeKind.LIVE, timeout=0.5)
    assert not result.ok and result.status_code is None
    assert result.reason == "no answer within 0.5s"
    assert result.latency_ms < 5000  # bounded by the timeout, not by the 30 s hang


def test_nothing_listening():
    result = probe(f"http://127.0.0.1:{free_port()}", ProbeKind.HEALTH)
    assert not result.ok and result.reason.startswith("cannot connect")


def test_wait_until_ready_once_the_service_recovers(service):
    service.answers["/ready"] = NOT_READY
    threading.Timer(0.6, lambda: service.answers.update({"/ready": HEALTHY["/ready"]})).start()
    result = wait_until_ready(service.url, deadline_seconds=10, interval=0.2)
    assert result.ok


def test_wait_until_ready_fails_with_the_last_reason(service):
    service.answers["/ready"] = NOT_READY
    with pytest.raises(ServiceNotReady, match=r"not ready after 0.6s \(\d+ probes\); last: Database unavailable"):
        wait_until_ready(service.url, deadline_seconds=0.6, interval=0.2)
