"""The monthly SLO report against Debian's Prometheus holding a month of synthetic data
(backfilled with `promtool tsdb create-blocks-from openmetrics`), checked against
figures computed by hand."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.slo_report import slo_report
from tasks.prometheus import PrometheusDown
from tasks.slo import SloSpec, days_of, month_bounds, quantile, under
from tests.conftest import free_port
from tests.slo_month import backfilled_prometheus


@pytest.fixture(scope="module")
def month_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with backfilled_prometheus(tmp_path_factory.mktemp("slo-prometheus")) as url:
        yield url


@pytest.fixture
def configure(write_config, tmp_path):
    def make(prom_url: str, services: tuple[str, ...] = ("api", "gappy", "quiet", "breach", "green")) -> Path:
        text = f'slo_report_dir = "{tmp_path / "reports"}"\n[prometheus]\nurl = "{prom_url}"\n'
        for name in services:
            text += (f'[services.{name}]\nbase_url = "http://127.0.0.1:1"\ncontroller = {{ kind = "process", '
                     f'command = ["true"], pid_file = "{tmp_path / name}.pid", log_file = "{tmp_path / name}.log" }}\n'
                     f"[slo.{name}]\n")
        return write_config(text)
    return make


def test_a_month_with_an_outage_and_a_slow_day_matches_the_hand_computation(month_prometheus, configure, tmp_path):
    configure(month_prometheus)
    r = slo_report("api", month="2026-11")
    total, errors = 43_200_000, 50_000
    assert r.hours == 720 and r.requests == pytest.approx(total) and r.measured_share == 1 and r.gaps == []
    assert r.availability == pytest.approx(1 - errors / total)  # 99.8843 %
    assert r.error_rate == pytest.approx(errors / total)
    assert r.latency_sli == pytest.approx((total - 1_440_000) / total)  # the slow day is over 100 ms
    assert r.p95_seconds == pytest.approx(0.05 * (0.95 * total) / (total - 1_440_000))  # 49.1 ms, in its bucket
    assert r.uptime == pytest.approx(1 - 3000 / (720 * 3600))  # 50 minutes down of the probes
    assert r.budget_requests == pytest.approx(0.001 * total) and r.budget_used_requests == pytest.approx(errors)
    assert r.budget_minutes == pytest.approx(43.2) and r.budget_used_minutes == pytest.approx(50)
    assert r.burn_rate == pytest.approx(errors / (0.001 * total))
    assert r.slo_met == {"availability": False, "latency": True, "error rate": False}
    assert r.sla_met == {"availability": True, "latency": True, "error rate": True} and r.credit_percent == 0
    assert r.worst_days[0] == f"2026-11-10 {1 - errors / 1_440_000:.4%}"
    saved = json.loads((tmp_path / "reports" / "api-2026-11.json").read_text())
    assert saved["availability"] == pytest.approx(r.availability)
    assert (tmp_path / "reports" / "api-2026-11.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = _artifact("slo-report-api")
    assert "](data:image/png;base64,iVBOR" in report and "**Service credit: 0 %**" in report
    assert "| availability (requests) | 99.8843% | ≥ 99.90% | **breached** | ≥ 99.50% | met |" in report
    assert "| 2026-11-10 | 1440000 | 96.5278% |" in report


def _artifact(key: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = client.request("POST", "/artifacts/filter", json={
            "artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}).json()
    assert found, f"no artifact {key}"
    return found[0]["data"]


def test_a_ten_hour_breach_earns_the_25_percent_credit(month_prometheus, configure):
    configure(month_prometheus)
    r = slo_report("breach", month="2026-11")
    assert r.availability == pytest.approx(1 - 600_000 / 43_200_000)  # 98.61 %
    assert r.sla_met["availability"] is False and r.credit_percent == 25


def test_an_all_green_month_meets_everything_and_owes_no_credit(month_prometheus, configure):
    configure(month_prometheus)
    r = slo_report("green", month="2026-11")
    assert r.availability == 1 and r.uptime == 1 and r.error_rate == 0 and r.burn_rate == 0
    assert r.slo_met == {"availability": True, "latency": True, "error rate": True}
    assert r.sla_met == {"availability": True, "latency": True, "error rate": True} and r.credit_percent == 0
    assert r.p95_seconds == pytest.approx(0.05 * 0.95)


def test_a_six_hour_gap_is_reported_as_a_gap_not_as_good(month_prometheus, configure):
    configure(month_prometheus)
    r = slo_report("gappy", month="2026-11")
    assert [(g.isoformat(), s) for g, s in r.gaps] == [("2026-11-15T12:00:00+00:00", 21600.0)]
    assert "- 2026-11-15 12:00 UTC, 6.00 h (360 min)" in _artifact("slo-report-gappy")
    assert "**99.17% measured** (the gaps below are not counted as good)" in _artifact("slo-report-gappy")
    assert r.measured_share == pytest.approx(1 - 6 / 720)
    assert r.uptime == 1.0  # of the time measured; the gap is not counted as up


def test_a_service_without_traffic_is_no_data_not_100_percent(month_prometheus, configure):
    configure(month_prometheus)
    r = slo_report("quiet", month="2026-11")
    assert r.requests is None and r.availability is None and r.error_rate is None
    assert r.slo_met == {"availability": None, "latency": None, "error rate": None} and r.credit_percent == 0
    assert r.uptime == 1.0


def test_prometheus_down_is_tried_again_then_a_clear_failure_without_a_report(configure):
    from prefect.client.orchestration import get_client

    configure(f"http://127.0.0.1:{free_port()}", services=("api",))
    with pytest.raises(PrometheusDown, match="is unreachable"):
        slo_report("api", month="2026-10")
    with get_client(sync_client=True) as client:
        found = client.request("POST", "/artifacts/filter", json={
            "artifacts": {"key": {"any_": ["slo-report-api"]}}, "sort": "CREATED_DESC"}).json()
    assert all("2026-10" not in (a.get("description") or "") for a in found)


def test_a_month_that_has_not_ended_or_is_not_a_month_is_refused(configure):
    from tasks.errors import ConfigError

    configure(f"http://127.0.0.1:{free_port()}", services=("api",))
    with pytest.raises(ConfigError, match=r"2099-01 has not ended yet \(it ends 2099-02-01 00:00 UTC\)"):
        slo_report("api", month="2099-01")
    for bad in ("2026-13", "November"):
        with pytest.raises(ConfigError, match="month must be YYYY-MM"):
            slo_report("api", month=bad)


def test_months_in_a_zone_february_and_a_dst_change():
    from zoneinfo import ZoneInfo

    start, end = month_bounds("2027-02", ZoneInfo("UTC"))
    assert (end - start).days == 28
    paris = ZoneInfo("Europe/Paris")
    march = month_bounds("2026-03", paris)
    assert (march[1] - march[0]).total_seconds() == 743 * 3600  # the clocks went forward
    october = month_bounds("2026-10", paris)
    assert (october[1] - october[0]).total_seconds() == 745 * 3600
    days = days_of(*october, paris)
    assert len(days) == 31 and (days[24][2] - days[24][1]).total_seconds() == 25 * 3600  # 25 October
    assert days[0][1].isoformat() == "2026-09-30T22:00:00+00:00"
    assert SloSpec(timezone="Europe/Paris").zone == paris
    with pytest.raises(ValueError, match="unknown time zone"):
        SloSpec(timezone="Mars/Olympus")


def test_histogram_arithmetic():
    buckets = [(0.05, 50.0), (0.1, 90.0), (0.25, 100.0), (float("inf"), 100.0)]
    assert under(buckets, 0.1) == 90 and under(buckets, 0.075) == pytest.approx(70)
    assert quantile(buckets, 0.95) == pytest.approx(0.1 + 0.15 * 0.5)
    assert under([], 0.1) is None and quantile([], 0.5) is None


def test_runbooks_slo_report_by_hand(month_prometheus, configure, tmp_path):
    from typer.testing import CliRunner

    from deployments.cli import app

    configure(month_prometheus, services=("breach",))
    result = CliRunner().invoke(app, ["slo", "report", "breach", "--month", "2026-11"])
    assert result.exit_code == 0, result.output
    assert f"report: {tmp_path / 'reports' / 'breach-2026-11.json'}" in result.output
    unknown = CliRunner().invoke(app, ["slo", "report", "api", "--month", "2026-11"])
    assert "no [slo.api] in runbooks.toml (configured: breach)" in str(unknown.exception)


def test_raw_samples_come_as_scraped_once_each_across_chunk_edges(month_prometheus):
    from datetime import timedelta

    from tasks.prometheus import PrometheusConfig, raw_samples

    start, end = month_bounds("2026-11", SloSpec().zone)
    (series,) = raw_samples(PrometheusConfig(url=month_prometheus), 'up{job="api"}', start, start + timedelta(days=2))
    times = [t for t, _ in series]
    assert len(times) == 2 * 288 + 1 and times == sorted(set(times))  # every 5 minutes, both ends, none twice
