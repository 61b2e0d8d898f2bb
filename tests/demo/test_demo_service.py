"""The demo target service, run for real (uvicorn in a subprocess) on the sample database
and the Redis here, probed with tasks.probes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import psycopg
import pytest

from tasks.probes import ProbeKind, probe, wait_until_ready
from tests.conftest import free_port
from tests.shared_redis import REDIS_URL, redis_namespace

@pytest.fixture(scope="module")
def redis_ns():
    with redis_namespace() as (client, ns):
        yield client, ns


def start(dsn: str, ns: str, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "demo.service", "--dsn", dsn, "--port", str(port),
                             "--redis", REDIS_URL, "--key-prefix", ns, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        if probe(url, ProbeKind.LIVE, timeout=0.5).ok:
            return proc, url
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"service did not start: {proc.stdout.read().decode() if proc.stdout else ''}")


@pytest.fixture
def service(sample_db, redis_ns):
    proc, url = start(sample_db, redis_ns[1])
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def add_key(dsn: str, tier: str = "free", revoked: bool = False) -> str:
    key = f"fq_test_{uuid.uuid4().hex}"
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO api_keys (user_id, key_prefix, key_hash, tier, revoked_at) "
                     "VALUES (1, %s, %s, %s, CASE WHEN %s THEN now() END)",
                     (key[:8], hashlib.sha256(key.encode()).hexdigest(), tier, revoked))
    return key


def test_probes_see_the_reference_shapes(service):
    _, url = service
    health, ready, live = (probe(url, k) for k in ProbeKind)
    assert health.ok and set(health.body) == {"status", "timestamp", "uptime_seconds"}
    assert ready.ok and ready.body == {"ready": True, "database_connected": True,
                                       "cache_available": True, "reason": None}
    assert live.ok and live.body["pid"] == service[0].pid
    metrics = httpx.get(f"{url}/metrics").text
    for name in ("fraiseql_http_requests_total", "fraiseql_query_duration_seconds",
                 "fraiseql_query_errors_total", "fraiseql_db_connections_active", "fraiseql_uptime_seconds"):
        assert name in metrics
    assert 'fraiseql_http_requests_total{status="200"}' in metrics


def test_not_ready_without_its_database(redis_ns):
    proc, url = start(f"postgresql://app@127.0.0.1:{free_port()}/nowhere", redis_ns[1])
    try:
        result = probe(url, ProbeKind.READY)
        assert not result.ok and result.status_code == 503 and result.reason == "Database unavailable"
        assert probe(url, ProbeKind.HEALTH).ok  # alive, just not ready
    finally:
        proc.kill()
        proc.wait()


def test_api_keys_and_rate_limits(service, sample_db, redis_ns):
    _, url = service
    client, ns = redis_ns
    good, revoked = add_key(sample_db, "free"), add_key(sample_db, "free", revoked=True)
    client.set(f"{ns}rate_limit:tier:free:requests_per_minute", 3)
    for header in (f"Bearer {revoked}", "Bearer fq_nope", "Bearer", "Basic abc", "", "Bearer " + "x" * 5000):
        r = httpx.get(f"{url}/api/orders", headers={"Authorization": header} if header else {})
        assert r.status_code == 401, header[:20]
    codes = [httpx.get(f"{url}/api/orders", headers={"Authorization": f"Bearer {good}"}).status_code
             for _ in range(4)]
    assert codes == [200, 200, 200, 429]


def test_fault_injection_and_recovery(service):
    proc, url = service
    assert httpx.post(f"{url}/admin/fault", json={"mode": "error"}).json() == {"fault": "error"}
    assert probe(url, ProbeKind.HEALTH).status_code == 500
    httpx.post(f"{url}/admin/fault", json={"mode": "hang"})
    hung = probe(url, ProbeKind.READY, timeout=0.5)
    assert not hung.ok and hung.reason == "no answer within 0.5s"
    assert probe(url, ProbeKind.LIVE).ok  # the process lives; it just does not answer work
    httpx.post(f"{url}/admin/fault", json={"mode": "none"})
    assert wait_until_ready(url, deadline_seconds=5, interval=0.1).ok
    os.kill(proc.pid, signal.SIGUSR1)  # the signal switch, for drills without HTTP
    time.sleep(0.2)
    assert not probe(url, ProbeKind.HEALTH, timeout=0.5).ok
    os.kill(proc.pid, signal.SIGUSR2)
    time.sleep(0.2)
    assert probe(url, ProbeKind.HEALTH).ok
    assert httpx.post(f"{url}/admin/fault", json={"mode": "melt"}).status_code == 422


def test_sigterm_lets_a_slow_request_finish(service):
    proc, url = service
    httpx.post(f"{url}/admin/fault", json={"mode": "slow"})  # 2 s per request
    answers: list[int] = []
    worker = threading.Thread(target=lambda: answers.append(httpx.get(f"{url}/health", timeout=10).status_code))
    worker.start()
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    worker.join(timeout=15)
    assert answers == [200]
    # uvicorn re-raises SIGTERM once it has shut down gracefully, so that is the exit status
    assert proc.wait(timeout=15) == -signal.SIGTERM


def test_crash_fault_kills_the_process(service):
    proc, url = service
    httpx.post(f"{url}/admin/fault", json={"mode": "crash"})
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)
    assert proc.wait(timeout=10) == 70


def test_every_api_request_is_audited_and_counted_by_key_with_bounded_labels(service, sample_db):
    from demo.service import KeyLabels

    _, url = service
    key = add_key(sample_db, "standard")
    headers = {"Authorization": f"Bearer {key}", "X-Forwarded-For": "10.9.8.7, 203.0.113.5"}
    assert httpx.get(f"{url}/api/profile", headers=headers).status_code == 200
    assert httpx.get(f"{url}/api/orders", headers={"Authorization": "Bearer fq_nope"}).status_code == 401
    with psycopg.connect(sample_db) as conn:
        target, details = conn.execute("SELECT target, details FROM audit_logs WHERE action = 'api.request' "
                                       "AND target IS NOT NULL ORDER BY id DESC LIMIT 1").fetchone()
        unknown = conn.execute("SELECT actor_user_id, target, details->>'status' FROM audit_logs "
                               "WHERE action = 'api.request' ORDER BY id DESC LIMIT 1").fetchone()
    assert target.startswith("api_key:") and details["operation"] == "profile"
    assert details["fields"] == ["users.id", "users.email", "users.name"] and details["tables"] == ["users"]
    assert details["ip"] == "203.0.113.5" and details["rows"] == 1 and details["status"] == 200  # the proxy's entry
    assert unknown == (None, None, "401")
    metrics = httpx.get(f"{url}/metrics").text
    assert f'fraiseql_api_key_requests_total{{key_prefix="{key[:8]}",status="200"}} 1.0' in metrics
    assert f'fraiseql_api_key_pii_requests_total{{key_prefix="{key[:8]}"}} 1.0' in metrics
    assert 'fraiseql_api_key_requests_total{key_prefix="unknown",status="401"} 1.0' in metrics
    assert 'fraiseql_auth_failures_total{reason="unknown"} 1.0' in metrics
    assert 'fraiseql_rate_limit_decisions_total{decision="allowed",tier="standard"} 1.0' in metrics

    labels = KeyLabels(2)
    assert [labels(p) for p in ("a", "b", "c", "a", None)] == ["a", "b", "other", "a", "unknown"]
