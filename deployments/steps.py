"""The pull step of every deployment that a worker runs (`prefect deploy` path): go to
the prefect-runbooks checkout named by RUNBOOKS_HOME on the worker's host.

Without it the run fails with one line that says what to set. Prefect would instead
print two tracebacks and call the run Crashed ("Process exited with status code: 1"),
so the step fails the run itself (Failed, with the line as its message, in its log too)
and ends the step's process without a traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def project_problem(home: str) -> str | None:
    if not home:
        return ("RUNBOOKS_HOME is not set where this worker runs: set it to the prefect-runbooks "
                "checkout (the folder with prefect.yaml) and restart the worker")
    if not (Path(home) / "prefect.yaml").is_file():
        return f"RUNBOOKS_HOME={home} is not a prefect-runbooks checkout (no prefect.yaml there)"
    return None


def set_project_directory() -> dict[str, str]:
    home = os.environ.get("RUNBOOKS_HOME", "").strip()
    problem = project_problem(home)
    if problem:
        _fail_run(problem)
    os.chdir(home)
    return {"directory": home}


def _fail_run(message: str) -> None:
    """Fail the flow run with `message` and leave; outside a worker's run, raise it."""
    from tasks.errors import ConfigError

    run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    if not run_id:
        raise ConfigError(message)
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler
    from prefect.logging.loggers import flow_run_logger
    from prefect.states import Failed
    from prefect.utilities.asyncutils import run_coro_as_sync

    with get_client(sync_client=True) as client:
        flow_run_logger(client.read_flow_run(UUID(run_id))).error(message)
        client.set_flow_run_state(UUID(run_id), Failed(message=message), force=True)
    run_coro_as_sync(APILogHandler.aflush())
    sys.stderr.flush()
    os._exit(0)  # the run is already Failed; a raise here would print tracebacks and mark it Crashed
