"""Runbook 1 through Prefect, on the demo service under the process controller."""

from __future__ import annotations

import sys

import httpx
import pytest

from flows.service_restart import service_restart
from tasks.config import load_settings
from tasks.errors import ConfigError
from tasks.probes import ServiceNotReady, wait_until_ready
from tests.conftest import free_port


def _config(tmp_path, dsn: str, port: int, command: list[str], extra: str = "") -> str:
    argv = ", ".join(f'"{a}"' for a in command)
    return f"""
[databases.orders]
dsn = "{dsn}"
[stores.local]
kind = "local"
path = "{tmp_path / 'store'}"
[services.api]
base_url = "http://127.0.0.1:{port}"
database = "orders"
ready_deadline_seconds = 20
watch_seconds = 1
controller = {{ kind = "process", command = [{argv}], pid_file = "{tmp_path / 'api.pid'}", log_file = "{tmp_path / 'api.log'}", grace_seconds = 5 }}
{extra}
"""


@pytest.fixture
def api(sample_db, tmp_path, write_config):
    port = free_port()
    write_config(_config(tmp_path, sample_db, port,
                         [sys.executable, "-m", "demo.service", "--dsn", sample_db, "--port", str(port),
                          "--redis", "none"]))
    ctl = load_settings().controller("api")
    ctl.start()
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url, deadline_seconds=20, interval=0.2)
    yield ctl, url
    ctl.stop()


def test_a_healthy_service_is_not_restarted(api):
    ctl, _ = api
    pid = ctl.status().pid
    result = service_restart("api")
    assert not result.restarted and result.why == "healthy: all probes pass"
    assert ctl.status().pid == pid


def test_a_hanging_service_is_restarted_and_recovers(api):
    ctl, url = api
    pid = ctl.status().pid
    httpx.post(f"{url}/admin/fault", json={"mode": "hang"})
    result = service_restart("api")
    assert result.restarted and "/health: no answer within 2s" in result.why
    assert 0 < result.seconds_to_ready <= result.seconds_to_healthy
    assert ctl.status().pid not in (None, pid)


def test_dry_run_and_force(api):
    ctl, url = api
    pid = ctl.status().pid
    httpx.post(f"{url}/admin/fault", json={"mode": "error"})
    plan = service_restart("api", dry_run=True)
    assert plan.dry_run and not plan.restarted and ctl.status().pid == pid
    httpx.post(f"{url}/admin/fault", json={"mode": "none"})
    forced = service_restart("api", force=True, watch_seconds=0)
    assert forced.restarted and forced.why == "forced while healthy" and ctl.status().pid != pid


def test_a_service_that_never_gets_ready_fails_critically_with_its_logs(sample_db, tmp_path, write_config, slack):
    port = free_port()
    never = [sys.executable, "-c", "import time; print('waiting for a config that never comes', flush=True); "
                                   "time.sleep(60)"]
    write_config(_config(tmp_path, sample_db, port, never, extra=f"""
[notify]
slack_token = "xoxb-test"
slack_api_url = "{slack.url}"
""").replace("ready_deadline_seconds = 20", "ready_deadline_seconds = 2"))
    try:
        with pytest.raises(ServiceNotReady, match="not ready after 2s"):
            service_restart("api")
    finally:
        load_settings().controller("api").stop()
    texts = [r["body"]["text"] for r in slack.requests]
    assert any(t.startswith("[CRITICAL] Service restart failed: api") for t in texts)
    critical = next(r for r in slack.requests if "[CRITICAL]" in r["body"]["text"])
    assert "waiting for a config that never comes" in json_dump(critical["body"]["blocks"])


def json_dump(obj: object) -> str:
    import json

    return json.dumps(obj)


def test_unknown_service_is_named(sample_db, tmp_path, write_config):
    write_config(_config(tmp_path, sample_db, free_port(), ["true"]))
    with pytest.raises(ConfigError, match=r"unknown service 'apii' \(known: api\)"):
        service_restart("apii")


def test_health_check_records_state_and_metrics(api, tmp_path):
    from flows.health_check import ServicesUnhealthy, health_check

    _, url = api
    metrics = tmp_path / "metrics" / "runbooks.prom"
    result = health_check(metrics_file=str(metrics))
    assert result.healthy and [s.service for s in result.services] == ["api"]
    text = metrics.read_text()
    assert 'runbooks_probe_success{service="api",probe="ready"} 1' in text
    httpx.post(f"{url}/admin/fault", json={"mode": "error"})
    with pytest.raises(ServicesUnhealthy, match="unhealthy: api"):
        health_check(metrics_file=str(metrics))
    assert 'runbooks_probe_success{service="api",probe="health"} 0' in metrics.read_text()
    assert 'runbooks_probe_success{service="api",probe="live"} 1' in metrics.read_text()


def test_a_service_that_crashes_on_start_fails_with_the_crash_log(sample_db, tmp_path, write_config):
    from prefect.client.orchestration import get_client

    port = free_port()
    crash = [sys.executable, "-c", "import sys; print('FATAL: config file missing', flush=True); sys.exit(3)"]
    write_config(_config(tmp_path, sample_db, port, crash).replace("ready_deadline_seconds = 20",
                                                                   "ready_deadline_seconds = 2"))
    with pytest.raises(ServiceNotReady):
        service_restart("api")
    with get_client(sync_client=True) as client:
        arts = client.request("POST", "/artifacts/filter", json={
            "artifacts": {"key": {"any_": ["service-restart-api"]}}, "sort": "CREATED_DESC",
            "limit": 1, "offset": 0}).json()
    report = arts[0]["data"]
    assert "**Outcome:** failed" in report and "FATAL: config file missing" in report
