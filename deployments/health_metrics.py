"""The runbooks' own health as Prometheus metrics, read from Prefect's record of their
runs: when each runbook last succeeded for each target, and whether its newest run
failed. The receiver's `/metrics` exports them (Prometheus scrapes it anyway), so the
rules in monitoring/ can alert on a backup older than 7 h, a restore test that failed or
is older than 8 days, or any runbook whose last run failed.

    runbooks_last_success_timestamp_seconds{flow="backup-database", target="orders"} 1.7e9
    runbooks_last_success_duration_seconds{flow="restore-test", target="orders"} 41.2
    runbooks_last_run_failed{flow="restore-test", target="orders"} 0
    runbooks_recent_runs{flow="backup-database", outcome="completed"} 98   (of the newest 100)
    runbooks_incidents_open 1

A target is the run's `database` or `service` parameter ("" when it has neither). The
record is read at most once a minute, whatever the scrape interval.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import httpx
from prometheus_client.core import GaugeMetricFamily

FAILED = ("FAILED", "CRASHED")
FINAL = ("COMPLETED", *FAILED)
SKIPPED = {"health-check"}  # probes every minute; its failures are the services' alerts
RUNS_PER_FLOW = 100
CACHE_SECONDS = 60.0


def target_of(run: dict[str, Any]) -> str:
    params = run.get("parameters") or {}
    return str(params.get("database") or params.get("service") or "")


def _end(run: dict[str, Any]) -> float:
    return datetime.fromisoformat(run["end_time"].replace("Z", "+00:00")).timestamp()


class Summary:
    """What the dashboards and alerts read of one flow's newest runs."""

    def __init__(self) -> None:
        self.success: dict[tuple[str, str], float] = {}  # last completion time
        self.duration: dict[tuple[str, str], float] = {}  # how long that run took (an RTO trend)
        self.failed: dict[tuple[str, str], int] = {}  # newest finished run failed?
        self.outcomes: dict[tuple[str, str], int] = {}  # (flow, completed|failed) among the newest


def summarise(flow: str, finished: list[dict[str, Any]], completed: list[dict[str, Any]], into: Summary) -> None:
    """Add the flow's newest finished and newest completed runs (each newest first)."""
    for run in completed:
        key = (flow, target_of(run))
        if key not in into.success:
            into.success[key] = _end(run)
            into.duration[key] = float(run.get("total_run_time") or 0.0)
    for run in finished:
        into.failed.setdefault((flow, target_of(run)), int(run.get("state_type") in FAILED))
        outcome = (flow, "failed" if run.get("state_type") in FAILED else "completed")
        into.outcomes[outcome] = into.outcomes.get(outcome, 0) + 1


class RunbookHealth:
    """A prometheus_client collector over a snapshot that `refresh` renews."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.summary = Summary()
        self.incidents_open = 0
        self.read_ok = 0
        self._read_at = 0.0
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Read Prefect's record unless it was read in the last minute; a failure leaves
        the last snapshot and sets runbooks_health_read_ok to 0."""
        async with self._lock:
            if time.monotonic() - self._read_at < CACHE_SECONDS:
                return
            self._read_at = time.monotonic()
            try:
                summary = Summary()
                flows = await self._post("flows/filter", {"limit": 200})
                for flow in flows:
                    if flow["name"] in SKIPPED:
                        continue
                    by_flow = {"flows": {"id": {"any_": [flow["id"]]}}, "sort": "END_TIME_DESC",
                               "limit": RUNS_PER_FLOW}
                    finished = await self._post("flow_runs/filter", {
                        **by_flow, "flow_runs": {"state": {"type": {"any_": list(FINAL)}}}})
                    completed = await self._post("flow_runs/filter", {
                        **by_flow, "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
                    summarise(flow["name"], finished, completed, summary)
                open_incidents = await self._post("flow_runs/filter", {
                    "flows": {"name": {"any_": ["incident-response"]}},
                    "flow_runs": {"state": {"type": {"any_": ["SCHEDULED", "PENDING", "RUNNING", "PAUSED"]}}}})
                self.summary, self.incidents_open, self.read_ok = summary, len(open_incidents), 1
            except (httpx.HTTPError, KeyError, ValueError):
                self.read_ok = 0

    async def _post(self, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        response = await self.client.post(path, json=body)
        response.raise_for_status()
        return response.json()

    def collect(self):  # type: ignore[no-untyped-def]
        success = GaugeMetricFamily("runbooks_last_success_timestamp_seconds",
                                    "When the runbook last completed for the target (unix time)",
                                    labels=["flow", "target"])
        s = self.summary
        for (flow, target), when in sorted(s.success.items()):
            success.add_metric([flow, target], when)
        duration = GaugeMetricFamily("runbooks_last_success_duration_seconds",
                                     "How long the runbook's last completed run for the target took",
                                     labels=["flow", "target"])
        for (flow, target), seconds in sorted(s.duration.items()):
            duration.add_metric([flow, target], seconds)
        failed = GaugeMetricFamily("runbooks_last_run_failed",
                                   "1 if the runbook's newest finished run for the target failed or crashed",
                                   labels=["flow", "target"])
        for (flow, target), value in sorted(s.failed.items()):
            failed.add_metric([flow, target], value)
        outcomes = GaugeMetricFamily("runbooks_recent_runs", f"The runbook's newest {RUNS_PER_FLOW} finished "
                                     "runs by outcome", labels=["flow", "outcome"])
        for (flow, outcome), count in sorted(s.outcomes.items()):
            outcomes.add_metric([flow, outcome], count)
        incidents = GaugeMetricFamily("runbooks_incidents_open", "Incident runs not finished yet")
        incidents.add_metric([], self.incidents_open)
        ok = GaugeMetricFamily("runbooks_health_read_ok", "1 if the last read of Prefect's run record worked")
        ok.add_metric([], self.read_ok)
        return [success, duration, failed, outcomes, incidents, ok]
