"""The monthly SLO report run the way users run it: `runbooks serve` serves its monthly
deployment, whose next run the server has scheduled for the 1st at 06:00 UTC; a run
started with `runbooks run` reads a backfilled month from Debian's Prometheus, and its
report shows its chart in the Prefect UI (Debian's chromium)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest

from tests.conftest import free_port
from tests.e2e.conftest import (BIN, SHOTS, api_client, base_env, deployments_by_name, run, spawn, wait_for,
                                write_config)
from tests.slo_month import backfilled_prometheus


@pytest.fixture(scope="module")
def slo_served(e2e_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("slo-e2e")
    with backfilled_prometheus(root / "prom") as prom:
        config = write_config(root / "runbooks.toml", e2e_database, root / "backups")
        config.write_text(f'slo_report_dir = "{root / "reports"}"\n' + config.read_text() + f"""
[prometheus]
url = "{prom}"
[services.api]
base_url = "http://127.0.0.1:1"
controller = {{ kind = "process", command = ["true"], pid_file = "{root}/api.pid", log_file = "{root}/api.log" }}
[slo.api]
""")
        port = free_port()
        env = base_env(root / "prefect-home", config)
        proc = spawn([str(BIN / "runbooks"), "serve", "--port", str(port), "--no-receiver"], env, root / "serve.log",
                     cwd=root)
        url = f"http://127.0.0.1:{port}/api"
        try:
            wait_for(lambda: "Serving " in proc.output() or proc.popen.poll() is not None, 120, "runbooks serve")
            assert proc.popen.poll() is None, proc.output()
            yield {"url": url, "ui": f"http://127.0.0.1:{port}", "env": {**env, "PREFECT_API_URL": url}, "root": root}
        finally:
            assert proc.stop() == 0, proc.output()[-3000:]
            assert "Traceback" not in proc.output(), proc.output()[-3000:]


def test_the_monthly_report_is_scheduled_for_the_1st_and_runs_by_hand_with_its_chart_in_the_ui(slo_served, page):
    with api_client(slo_served["url"]) as client:
        deployment = wait_for(lambda: deployments_by_name(client).get("slo-report-api"), 60, "the deployment")
        scheduled = wait_for(lambda: client.post("/flow_runs/filter", json={
            "deployments": {"id": {"any_": [deployment["id"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}, "sort": "EXPECTED_START_TIME_ASC"}).json(),
            60, "the scheduler to schedule the report")
    first = datetime.fromisoformat(scheduled[0]["expected_start_time"].replace("Z", "+00:00"))
    now = datetime.now(timezone.utc)
    assert (first.day, first.hour, first.minute) == (1, 6, 0) and now < first
    assert (first.year, first.month) == ((now.year, now.month + 1) if now.month < 12 else (now.year + 1, 1))

    done = run([str(BIN / "runbooks"), "run", "slo-report-api", "-p", "month=2026-11", "--watch"], slo_served["env"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert (slo_served["root"] / "reports" / "api-2026-11.json").exists()
    with api_client(slo_served["url"]) as client:
        (report,) = client.post("/artifacts/filter", json={"artifacts": {"key": {"any_": ["slo-report-api"]}}}).json()
    assert "**Service credit: 0 %**" in report["data"] and "99.8843%" in report["data"]

    page.goto(f"{slo_served['ui']}/artifacts/artifact/{report['id']}")
    page.get_by_text("SLO report: api, 2026-11").wait_for()
    chart = page.locator("img[alt^='daily availability']")
    chart.wait_for()
    assert chart.evaluate("e => e.complete && e.naturalWidth") >= 800  # decoded, not a broken image
    page.screenshot(path=str(SHOTS / "12-slo-report.png"), full_page=True)
