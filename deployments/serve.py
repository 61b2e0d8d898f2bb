"""Serve every deployment in prefect.yaml from this process: schedules fire here and
runs started from the UI (typed parameter forms) execute here. prefect.yaml stays the
one place where deployments are described."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect import serve
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import RunnerDeployment
from prefect.flows import load_flow_from_entrypoint

PROJECT = Path(__file__).resolve().parent.parent


def load_deployments(path: Path = PROJECT / "prefect.yaml") -> list[RunnerDeployment]:
    """Build a RunnerDeployment for every entry of prefect.yaml."""
    spec: dict[str, Any] = yaml.safe_load(path.read_text())
    out = []
    for entry in spec["deployments"]:
        flow = load_flow_from_entrypoint(str(PROJECT / entry["entrypoint"]))
        schedules = [CronSchedule(cron=s["cron"], timezone=s.get("timezone", "UTC"))
                     for s in entry.get("schedules", [])]
        limit = entry.get("concurrency_limit") or {}
        out.append(flow.to_deployment(
            name=entry["name"], description=entry.get("description"), tags=entry.get("tags"),
            parameters=entry.get("parameters") or {}, schedules=schedules,
            concurrency_limit=limit.get("limit")))
    return out


def serve_all() -> None:
    serve(*load_deployments())
