"""Runbook 1 through Prefect, on the demo service under the process controller."""

from __future__ import annotations

import sys

import httpx
import pytest

from flows.service_restart import ErrorRateTooHigh, ErrorsInLogs, service_restart
from tasks.config import load_settings
from tasks.errors import ConfigError, RunbookError
from tasks.probes import ServiceNotReady, wait_until_ready
from tasks.prometheus import MetricsUnavailable
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
    report = _report("service-restart-api")
    assert "| Errors in logs since restart | 0 in " in report and "lines, no errors |" in report


def test_dry_run_and_force(api):
    ctl, url = api
    pid = ctl.status().pid
    httpx.post(f"{url}/admin/fault", json={"mode": "error"})
    plan = service_restart("api", dry_run=True)
    assert plan.dry_run and not plan.restarted and ctl.status().pid == pid
    httpx.post(f"{url}/admin/fault", json={"mode": "none"})
    forced = service_restart("api", force=True, watch_seconds=0)
    # The 500s logged before the restart do not count against the new process (step 6).
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


def test_errors_logged_after_the_restart_fail_it_as_not_proven(sample_db, tmp_path, write_config, slack):
    """A bad release that only the logs show (no Prometheus here): /health stays green,
    but the requests it fails after the restart are errors in its log."""
    port = free_port()
    command = [sys.executable, "-m", "demo.service", "--dsn", sample_db, "--port", str(port), "--redis", "none",
               "--fault", "api-error"]
    write_config(_config(tmp_path, sample_db, port, command, extra=f"""
[notify]
slack_token = "xoxb-test"
slack_api_url = "{slack.url}"
"""))
    ctl = load_settings().controller("api")
    ctl.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, deadline_seconds=20, interval=0.2)
        with Traffic(url):
            with pytest.raises(ErrorsInLogs, match=r"\d+ error lines in the logs since the restart; first: .*"
                                                   r'"GET /api/orders HTTP/1.1" 500 Internal Server Error'):
                service_restart("api", force=True, watch_seconds=2)
    finally:
        ctl.stop()
    texts = [r["body"]["text"] for r in slack.requests]
    assert any(t.startswith("[HIGH] Service restart failed: api") and "its logs show errors since the restart" in t
               for t in texts)
    assert not any("[CRITICAL]" in t for t in texts)
    report = _report("service-restart-api")
    assert "| Errors in logs since restart |" in report and "Time to healthy" in report


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
    (tmp_path / "plain-file").write_text("")
    with pytest.raises(RunbookError, match=r"cannot write the metrics file .*plain-file/x.prom: \w"):
        health_check(metrics_file=str(tmp_path / "plain-file" / "x.prom"))


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


# --- The error rate, from a real Prometheus scraping the demo service every second ---

class Traffic:
    """Requests to /api/orders (no key: 401 when well, 500 under an api-error fault)
    from a background thread, so there is an error rate to measure."""

    def __init__(self, url: str) -> None:
        import threading

        self.url, self.stop = url, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                httpx.get(f"{self.url}/api/orders", timeout=1)
            except httpx.HTTPError:
                pass  # restarting
            self.stop.wait(0.05)

    def __enter__(self) -> "Traffic":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _until(prom_url: str, promql: str, good, what: str) -> None:
    """Wait (up to 20 s) until Prometheus's answer to `promql` satisfies `good`."""
    import time

    from tasks.prometheus import MetricsUnavailable, PrometheusConfig, query_value

    for _ in range(100):
        try:
            if good(query_value(PrometheusConfig(url=prom_url), promql)):
                return
        except MetricsUnavailable:
            pass
        time.sleep(0.2)
    raise AssertionError(f"Prometheus never {what}")


def _until_error_rate_above(prom_url: str, promql: str, threshold: float) -> None:
    _until(prom_url, promql, lambda v: v is not None and v > threshold, "saw the injected errors")


def _until_error_rate_readable(prom_url: str, promql: str) -> None:
    _until(prom_url, promql, lambda v: v is not None, "had traffic to take a rate from")


def _report(key: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        arts = client.request("POST", "/artifacts/filter", json={
            "artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1, "offset": 0}).json()
    return arts[0]["data"]


def _service_with_prometheus(sample_db, tmp_path, write_config, prometheus, fault: str = "none",
                             service_lines: str = "", prom_url: str | None = None) -> tuple:
    """The demo service under the process controller, scraped by Prometheus as job "api"
    (or, given `prom_url`, configured with that Prometheus instead)."""
    port = free_port()
    prom_url = prom_url or prometheus({"api": f"127.0.0.1:{port}"})
    command = [sys.executable, "-m", "demo.service", "--dsn", sample_db, "--port", str(port), "--redis", "none",
               "--fault", fault]
    extra = f'{service_lines}\n[prometheus]\nurl = "{prom_url}"\ntimeout = 2\n'
    write_config(_config(tmp_path, sample_db, port, command, extra=extra).replace("watch_seconds = 1",
                                                                                  "watch_seconds = 8"))
    ctl = load_settings().controller("api")
    ctl.start()
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url, deadline_seconds=20, interval=0.2)
    return ctl, url, prom_url


FAST_QUERY = ('(sum(rate(fraiseql_http_requests_total{job="$job",status=~"5.."}[5s])) or vector(0))'
              ' / sum(rate(fraiseql_http_requests_total{job="$job"}[5s]))')


def test_a_high_error_rate_is_the_problem_and_must_be_gone_after_the_restart(
        sample_db, tmp_path, write_config, prometheus):
    """The probes pass (only /api/ fails): Prometheus's error rate is what says the
    service is sick, and what proves the restart cured it."""
    ctl, url, prom_url = _service_with_prometheus(sample_db, tmp_path, write_config, prometheus,
                                                  service_lines=f"error_rate_query = '{FAST_QUERY}'")
    pid = ctl.status().pid
    try:
        with Traffic(url):
            _until_error_rate_readable(prom_url, FAST_QUERY.replace("$job", "api"))
            healthy = service_restart("api")
            assert not healthy.restarted and ctl.status().pid == pid
            assert healthy.why == "healthy: all probes pass, error rate 0.00% (threshold 0.10%)"
            httpx.post(f"{url}/admin/fault", json={"mode": "api-error"})
            _until_error_rate_above(prom_url, FAST_QUERY.replace("$job", "api"), 0.5)
            result = service_restart("api")
    finally:
        ctl.stop()
    assert result.restarted and result.why.startswith("error rate ") and "(threshold 0.10%)" in result.why
    assert result.error_rate_before > 0.5 and result.error_rate_after is not None
    assert result.error_rate_after <= 0.001
    assert ctl.status().pid != pid
    report = _report("service-restart-api")
    assert "Error rate while watching" in report and "**Outcome:** recovered" in report


def test_an_error_rate_a_restart_does_not_cure_fails_the_run_critically(
        sample_db, tmp_path, write_config, prometheus, slack):
    """A bad release: the service starts with the fault, so the restart brings it back
    with the fault. The 5 s window is over by the end of the 8 s watch: the errors it
    sees are the new process's."""
    ctl, url, prom_url = _service_with_prometheus(
        sample_db, tmp_path, write_config, prometheus, fault="api-error",
        service_lines=f"error_rate_query = '{FAST_QUERY}'\n"
                      f'[notify]\nslack_token = "xoxb-test"\nslack_api_url = "{slack.url}"')
    pid = ctl.status().pid
    try:
        with Traffic(url):
            _until_error_rate_above(prom_url, FAST_QUERY.replace("$job", "api"), 0.5)
            with pytest.raises(ErrorRateTooHigh, match=r"error rate is still \d+\.\d\d% \(threshold 0\.10%\) "
                                                       r"after watching for 8s"):
                service_restart("api")
        assert ctl.status().pid not in (None, pid)  # restarted, and still up
    finally:
        ctl.stop()
    critical = [r["body"]["text"] for r in slack.requests if "[CRITICAL]" in r["body"]["text"]]
    assert critical and "did not bring it back" in critical[0]
    report = _report("service-restart-api")
    assert "**Outcome:** failed" in report and "Error rate after" in report


def test_an_unreachable_prometheus_leaves_the_restart_unverified(sample_db, tmp_path, write_config, slack):
    """The probes decide whether to restart; the run then fails as not verified (HIGH),
    naming Prometheus, while the service is back."""
    gone = f"http://127.0.0.1:{free_port()}"
    ctl, url, _ = _service_with_prometheus(
        sample_db, tmp_path, write_config, None, prom_url=gone,
        service_lines=f'[notify]\nslack_token = "xoxb-test"\nslack_api_url = "{slack.url}"')
    pid = ctl.status().pid
    httpx.post(f"{url}/admin/fault", json={"mode": "hang"})
    try:
        with pytest.raises(MetricsUnavailable, match=f"Prometheus at {gone} is unreachable"):
            service_restart("api", watch_seconds=1)
        assert ctl.status().pid != pid
        wait_until_ready(url, deadline_seconds=5, interval=0.2)
    finally:
        ctl.stop()
    texts = [r["body"]["text"] for r in slack.requests]
    assert any(t.startswith("[HIGH] Service restart failed: api") and "could not be checked" in t for t in texts)
    assert not any("[CRITICAL]" in t for t in texts)
    assert "Before: error rate | unknown: Prometheus at" in _report("service-restart-api")
