"""`runbooks run NAME`: start a deployment from a terminal, checking its parameters
against the deployment's schema before any run exists, and (`--watch`) follow the run
to its end: task states, its log lines, its report's figures and an exit code."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from deployments.server import require_server
from deployments.spec import check_against_schema, find_spec
from tasks.errors import ConfigError, RunbookError

EXIT_COMPLETED, EXIT_FAILED, EXIT_OPERATOR = 0, 1, 2
WATCH_POLL_SECONDS = 1.0


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; a value is JSON when it parses (numbers, true, null, "text"),
    else the text itself."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"--param {pair!r}: expected key=value")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def start(name: str, params: dict[str, Any]) -> tuple[Any, str]:
    """Create a run of deployment `name`; returns (flow run, the server's API URL)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = require_server()
    spec = find_spec(name)
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(spec.full_name)
        except ObjectNotFound:
            raise RunbookError(f"deployment {spec.full_name} is not registered at {url}: "
                               "is `runbooks serve` (or `prefect deploy --all`) running against it?") from None
        check_against_schema(spec.name, deployment.parameter_openapi_schema or {}, params)
        run = client.create_flow_run_from_deployment(deployment.id, parameters=params)
    return run, url


def run_page(api_url: str, run_id: UUID) -> str:
    return f"{api_url.removesuffix('/api')}/runs/flow-run/{run_id}"


def operator_error(message: str | None) -> bool:
    """Was the run failed by one of our own errors (its message says what to fix)?"""
    import flows.health_check  # noqa: F401 - defines, with the modules it imports, our errors
    import flows.service_restart  # noqa: F401
    import flows.database_corruption  # noqa: F401 - and, through it, tasks.recovery
    import tasks.approval  # noqa: F401
    from tasks import errors

    names = {c.__name__ for c in _subclasses(errors.RunbookError)}
    return any(re.search(rf"\b{n}: ", message or "") for n in names)


def _subclasses(cls: type) -> list[type]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _subclasses(sub)
    return out


def watch(run_id: UUID, url: str, say: Callable[[str], None]) -> int:
    """Follow the run on the server at `url` until it ends; returns the exit code."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, LogFilter,
                                                LogFilterFlowRunId, LogFilterTimestamp)
    from prefect.client.schemas.sorting import LogSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    seen_logs: set[UUID] = set()
    task_states: dict[UUID, str] = {}
    last_state, drained, since = "", False, None
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            state = run.state.name if run.state else "Unknown"
            if state != last_state and not drained:
                say(f"run {run.name}: {state}")
                last_state = state
            for task in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))):
                tstate = task.state.name if task.state else "Unknown"
                if task_states.get(task.id) != tstate:
                    task_states[task.id] = tstate
                    say(f"  task {task.name}: {tstate}")
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]),
                                                         timestamp=LogFilterTimestamp(after_=since)),
                                    sort=LogSort.TIMESTAMP_ASC, limit=200)
            for log in logs:
                if log.id not in seen_logs:
                    seen_logs.add(log.id)
                    since = log.timestamp
                    say(f"  {log.timestamp:%H:%M:%S} {log.message.splitlines()[0] if log.message else ''}")
            if run.state and run.state.is_final():
                if drained:
                    break
                drained = True  # one more read: the run's last log lines arrive after its state
            time.sleep(WATCH_POLL_SECONDS)
        figures = _report_figures(client, run_id)
    for key, value in figures:
        say(f"  {key}: {value}")
    message = run.state.message if run.state else ""
    if run.state and run.state.is_completed():
        say(f"run {run.name}: completed")
        return EXIT_COMPLETED
    say(f"run {run.name}: {state.lower()}" + (f": {message}" if message else ""))
    return EXIT_OPERATOR if operator_error(message) else EXIT_FAILED


def _report_figures(client: Any, run_id: UUID) -> list[tuple[str, str]]:
    """The `## Figures` table of the run's report artifact(s)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    out = []
    for artifact in client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))):
        text = artifact.data if isinstance(artifact.data, str) else ""
        in_figures = False
        for line in text.splitlines():
            if line.startswith("## "):
                in_figures = line == "## Figures"
            elif in_figures and line.startswith("| ") and not line.startswith(("| figure", "|---")):
                cells = [c.strip() for c in line.strip("|").split(" | ")]
                if len(cells) == 2:
                    out.append((cells[0], cells[1]))
    return out
