"""Instant queries against a real Prometheus, and each way one can go wrong."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from tasks.prometheus import ErrorRate, MetricsUnavailable, PrometheusConfig, query_value
from tests.conftest import free_port


@pytest.fixture
def prom(prometheus) -> PrometheusConfig:
    return PrometheusConfig(url=prometheus({"nothing": f"127.0.0.1:{free_port()}"}), timeout=2)


def test_one_number(prom):
    assert query_value(prom, "vector(0.25)") == 0.25
    assert query_value(prom, "scalar(vector(3))") == 3.0
    assert query_value(prom, "vector(0) / vector(0)") is None  # 0/0: no traffic


def test_no_data_several_series_and_bad_promql_are_clear_errors(prom):
    with pytest.raises(MetricsUnavailable, match="returned no data"):
        query_value(prom, 'up{job="no-such-job"}')
    two = 'label_replace(vector(1), "a", "x", "", "") or label_replace(vector(2), "a", "y", "", "")'
    with pytest.raises(MetricsUnavailable, match="returned 2 series; it must return one number"):
        query_value(prom, two)
    with pytest.raises(MetricsUnavailable, match=r"rejected the query 'rate\(x\[': bad_data"):
        query_value(prom, "rate(x[")


@pytest.fixture
def standin():
    """Factory: an HTTP server on loopback answering every GET with (status, body), after
    `delay` seconds, once it has given the `first` answers: for answers a real Prometheus
    does not give. `calls` collects the paths asked for."""
    servers = []

    def start(status: int, body: bytes, delay: float = 0, first: list[tuple[int, bytes]] | None = None,
              calls: list[str] | None = None) -> PrometheusConfig:
        queued, seen = list(first or []), calls if calls is not None else []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                time.sleep(delay)
                seen.append(self.path)
                answer_status, answer = queued.pop(0) if queued else (status, body)
                self.send_response(answer_status)
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return PrometheusConfig(url=f"http://127.0.0.1:{server.server_port}/", timeout=1)

    yield start
    for server in servers:
        server.shutdown()


def test_unreachable_slow_and_not_prometheus(standin):
    gone = PrometheusConfig(url=f"http://127.0.0.1:{free_port()}", timeout=1)
    with pytest.raises(MetricsUnavailable, match=f"Prometheus at {gone.url} is unreachable"):
        query_value(gone, "vector(1)")
    slow = standin(200, b'{"status": "success"}', delay=2)
    with pytest.raises(MetricsUnavailable, match=f"Prometheus at {slow.url} did not answer within 1s"):
        query_value(slow, "vector(1)")
    for status, body in [(404, b"<html>not here</html>"), (404, b'{"detail": "Not Found"}'), (200, b"[1, 2]")]:
        with pytest.raises(MetricsUnavailable, match=f"answered HTTP {status} with something else than its "
                                                     r"API's JSON \(is that URL Prometheus\?\)"):
            query_value(standin(status, body), "vector(1)")


@pytest.mark.parametrize("data", [
    b'{"resultType": "vector", "result": [{"metric": {}}]}',
    b'{"resultType": "vector", "result": [{"metric": {}, "value": [1, "many"]}]}',
    b'{"resultType": "matrix", "result": [{"metric": {}, "values": [[1, "1"]]}]}',
    b'{"resultType": "scalar"}',
    b'"nonsense"',
])
def test_a_malformed_success_is_an_error_not_a_crash(standin, data):
    prom = standin(200, b'{"status": "success", "data": ' + data + b"}")
    with pytest.raises(MetricsUnavailable, match="result, not one number"):
        query_value(prom, "vector(1)")


def test_an_error_rate_must_be_a_share(prom):
    assert ErrorRate(prom, "vector(0.5)", 0.001).read() == 0.5
    for promql in ("vector(2)", "vector(-0.1)", "vector(1) / vector(0)"):
        with pytest.raises(MetricsUnavailable, match="it must give a share from 0 to 1"):
            ErrorRate(prom, promql, 0.001).read()


def test_url_must_be_http_without_credentials(write_config):
    from tasks.config import load_settings
    from tasks.errors import ConfigError

    with pytest.raises(ValidationError, match="must start with http"):
        PrometheusConfig(url="127.0.0.1:9090")
    write_config('[prometheus]\nurl = "http://admin:s3cret-pw@127.0.0.1:9090"\n')
    with pytest.raises(ConfigError, match="prometheus.url: must not hold a user or password") as err:
        load_settings()
    assert "s3cret-pw" not in str(err.value)


def test_instant_vectors_at_a_time_parse_nan_and_inf(prom):
    """(Raw samples against a month of data: tests/flows/test_slo_report.py.)"""
    from datetime import datetime, timedelta, timezone

    from tasks.prometheus import query_at, raw_samples

    now = datetime.now(timezone.utc)
    promql = ('label_replace(vector(1) / vector(0), "x", "inf", "", "") or '
              'label_replace(vector(0) / vector(0), "x", "nan", "", "") or '
              'label_replace(vector(-1) / vector(0), "x", "neg", "", "")')
    values = {labels["x"]: value for labels, value in query_at(prom, promql, now)}
    assert values["inf"] == float("inf") and values["neg"] == float("-inf") and values["nan"] != values["nan"]
    assert query_at(prom, "scalar(vector(3))", now) == [({}, 3.0)]
    assert query_at(prom, "nothing_here", now) == []
    assert raw_samples(prom, 'never_scraped{job="x"}', now - timedelta(seconds=20), now) == []
    with pytest.raises(MetricsUnavailable, match="ranges only allowed for vector selectors"):
        raw_samples(prom, "sum(up)", now - timedelta(seconds=5), now)


def test_a_prometheus_answering_5xx_is_asked_again_and_a_bad_query_is_not(standin):
    from datetime import datetime, timezone

    from tasks.prometheus import PrometheusDown, query_at

    starting = (503, b'{"status": "error", "errorType": "unavailable", "error": "starting"}')
    answer = b'{"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1, "2.5"]}]}}'
    calls: list[str] = []
    now = datetime.now(timezone.utc)
    flaky = standin(200, answer, first=[starting, starting], calls=calls)
    assert query_at(flaky, "up", now) == [({}, 2.5)] and len(calls) == 3  # two 503s, then the answer
    calls.clear()
    down = standin(*starting, calls=calls)
    with pytest.raises(PrometheusDown, match="answered HTTP 503: starting"):
        query_at(down, "up", now, retries=1)
    assert len(calls) == 2
    bad = standin(400, b'{"status": "error", "errorType": "bad_data", "error": "parse error"}')
    with pytest.raises(MetricsUnavailable, match="rejected the query 'up ==': bad_data: parse error") as err:
        query_at(bad, "up ==", now)
    assert not isinstance(err.value, PrometheusDown)
