"""Process-wide defaults for our entry points (CLI, demo, serve, tests), set before
Prefect is imported: no telemetry, and no server log noise ("database is locked",
CancelledError tracebacks from the temporary server's shutdown) in a terminal."""

import logging
import os
from pathlib import Path

QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
    "PREFECT_LOGGING_LOG_PRINTS": "true",
}


def quiet_prefect() -> None:
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    if not os.environ.get("XDG_RUNTIME_DIR"):
        # pgserver asks platformdirs for a runtime dir, which warns when none is set
        # (root shells, CI). Give it the private one it would fall back to anyway.
        runtime = Path(f"/tmp/runtime-{os.getuid()}")
        runtime.mkdir(mode=0o700, exist_ok=True)
        if runtime.stat().st_uid == os.getuid():  # never someone else's directory
            runtime.chmod(0o700)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)


_CHATTER = ("Starting temporary server", "Stopping temporary server", "Still processing items")


class _TidyLogs:
    """Drops the temporary server's start/stop notices, and the traceback under a
    failure we raised on purpose (its one-line message says what to fix). Every flow
    and task log line stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(_CHATTER):
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _is_operator_error(exc):
            record.exc_info, record.exc_text = None, None
            text = (str(exc).strip().splitlines() or [""])[0]
            if text and text not in record.getMessage():
                record.msg, record.args = f"{record.getMessage()}: {type(exc).__name__}: {text}", None
        return True


def _is_operator_error(exc: BaseException) -> bool:
    from tasks.errors import DatabaseUnavailable, RunbookError, TransientStoreError

    return isinstance(exc, (RunbookError, TransientStoreError, DatabaseUnavailable))


def tidy_prefect_logs() -> None:
    """Call after Prefect has configured logging (importing prefect.main does)."""
    import prefect.main  # noqa: F401 - configures Prefect's console handler

    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _TidyLogs) for f in handler.filters):
            handler.addFilter(_TidyLogs())
