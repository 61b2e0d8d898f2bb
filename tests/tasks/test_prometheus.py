"""Instant queries against a real Prometheus, and each way one can go wrong."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from tasks.prometheus import MetricsUnavailable, PrometheusConfig, query_value
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
    with pytest.raises(MetricsUnavailable, match="returned 2 series of type vector; it must return one number"):
        query_value(prom, two)
    with pytest.raises(MetricsUnavailable, match=r"rejected the query 'rate\(x\[': bad_data"):
        query_value(prom, "rate(x[")


def test_unreachable_and_not_prometheus():
    gone = PrometheusConfig(url=f"http://127.0.0.1:{free_port()}", timeout=1)
    with pytest.raises(MetricsUnavailable, match=f"Prometheus at {gone.url} is unreachable"):
        query_value(gone, "vector(1)")

    class Html(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b"<html>not here</html>")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Html)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        other = PrometheusConfig(url=f"http://127.0.0.1:{server.server_port}/")
        with pytest.raises(MetricsUnavailable, match="answered HTTP 404 without JSON"):
            query_value(other, "vector(1)")
    finally:
        server.shutdown()


def test_url_must_be_http():
    with pytest.raises(ValidationError, match="must start with http"):
        PrometheusConfig(url="127.0.0.1:9090")
