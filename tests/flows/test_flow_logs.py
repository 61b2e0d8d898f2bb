"""Failures we raise on purpose are logged as one line, without a traceback, in every
process that runs a flow (the runner's child processes import flows/_common.py)."""

from __future__ import annotations

import logging
import sys

from flows._common import _TidyLogs
from tasks.errors import BackupNotFound


def _record(msg: str, exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, msg, None, sys.exc_info())


def test_prefects_console_and_run_log_handlers_are_filtered():
    from prefect.logging.handlers import APILogHandler, PrefectConsoleHandler

    handlers = [h for name in ("", "prefect.flow_runs", "prefect.task_runs") for h in logging.getLogger(name).handlers
                if isinstance(h, (APILogHandler, PrefectConsoleHandler))]
    assert {type(h) for h in handlers} == {APILogHandler, PrefectConsoleHandler}
    assert all(any(isinstance(f, _TidyLogs) for f in h.filters) for h in handlers)


def test_an_operator_error_loses_its_traceback_and_its_repeat():
    tidy = _TidyLogs()
    record = _record("Encountered exception during execution", BackupNotFound("no backups of database 'orders'"))
    assert tidy.filter(record) and record.exc_info is None
    assert record.getMessage() == ("Encountered exception during execution: BackupNotFound: "
                                   "no backups of database 'orders'")
    assert not tidy.filter(_record("Engine execution exited with unexpected exception", BackupNotFound("x")))


def test_a_bug_keeps_its_traceback():
    tidy = _TidyLogs()
    for msg in ("Encountered exception during execution", "Engine execution exited with unexpected exception"):
        record = _record(msg, ZeroDivisionError("division by zero"))
        assert tidy.filter(record) and record.exc_info is not None and record.getMessage() == msg


def test_each_flow_installs_the_filter_where_a_runner_loads_it():
    """A fresh process that loads one flow by its prefect.yaml entrypoint, as the child
    process of `runbooks serve` or a worker does, gets the filter from that alone."""
    import subprocess

    import yaml

    from deployments.spec import PROJECT

    check = """
import logging, sys
from prefect.flows import load_flow_from_entrypoint
from prefect.logging.handlers import APILogHandler, PrefectConsoleHandler
load_flow_from_entrypoint(sys.argv[1])
handlers = [h for name in ("", "prefect.flow_runs") for h in logging.getLogger(name).handlers
            if isinstance(h, (APILogHandler, PrefectConsoleHandler))]
print(len(handlers), sorted({type(f).__name__ for h in handlers for f in h.filters}))
"""
    entrypoints = sorted({d["entrypoint"] for d in yaml.safe_load((PROJECT / "prefect.yaml").read_text())["deployments"]})
    modules = {f"flows/{f.name}" for f in (PROJECT / "flows").glob("*.py") if not f.name.startswith("_")}
    assert {e.split(":")[0] for e in entrypoints} == modules  # every flow module has a deployment
    one_per_module = {e.split(":")[0]: e for e in entrypoints}.values()  # the filter comes with the import
    procs = {e: subprocess.Popen([sys.executable, "-c", check, str(PROJECT / e)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=PROJECT) for e in one_per_module}
    for entrypoint, proc in procs.items():  # all at once: each is a fresh process of its own
        out, err = proc.communicate(timeout=120)
        assert out.strip() == "2 ['_TidyLogs']", (entrypoint, out, err[-2000:])
