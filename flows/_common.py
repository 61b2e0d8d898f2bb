"""What every flow does around its steps: tell people when it starts waiting, fails or
succeeds, with the figures it measured and a link to the run; and keep tracebacks out
of the log for failures we raised on purpose."""

from __future__ import annotations

import logging

from tasks.config import Settings
from tasks.errors import ConfigError
from tasks.notify import Notification, Severity, send
from tasks.postgres import Database
from tasks.report import RunReport, first_line
from tasks.security import SecurityConfig


def run_url() -> str | None:
    try:
        from prefect.runtime import flow_run

        url = flow_run.ui_url
    except Exception:  # noqa: BLE001 - a link is a courtesy, never a failure
        return None
    return url if url and url.startswith("http") else None


def announce(settings: Settings, run: RunReport, severity: Severity, text: str,
             failed: BaseException | None = None) -> None:
    """Send the run's outcome (or a failure) to every configured channel."""
    title = f"{run.title} {'failed' if failed else run.outcome}: {run.target}"
    body = f"{text}\n{first_line(failed)}" if failed else text
    send(settings.notify, Notification(title=title, text=body, severity=severity,
                                       fields=dict(run.figures), run_url=run_url()))


def security_targets(settings: Settings) -> tuple[SecurityConfig, Database, str]:
    """The [security] section, its database and its service's base URL."""
    cfg = settings.security
    if cfg is None:
        raise ConfigError("no [security] section in runbooks.toml: say which service's keys to manage "
                          "(docs/api-key-revocation.md)")
    service = settings.service(cfg.service)
    name = cfg.database or service.database
    if name is None:
        raise ConfigError(f"[security] needs a database: services.{cfg.service} names none")
    return cfg, settings.database(name), service.base_url


_CHATTER = ("Starting temporary server", "Stopping temporary server", "Still processing items")
# Prefect's last word on a failed run, after it already logged the failure itself.
_REPEAT = "Engine execution exited with unexpected exception"


class _TidyLogs:
    """Drops the temporary server's start/stop notices, and the traceback under a
    failure we raised on purpose (its one-line message says what to fix). Every flow
    and task log line stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(_CHATTER):
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _is_operator_error(exc):
            if str(record.msg).startswith(_REPEAT):
                return False
            record.exc_info, record.exc_text = None, None
            text = (str(exc).strip().splitlines() or [""])[0]
            if text and text not in record.getMessage():
                record.msg, record.args = f"{record.getMessage()}: {type(exc).__name__}: {text}", None
        return True


def _is_operator_error(exc: BaseException) -> bool:
    from tasks.errors import DatabaseUnavailable, RunbookError, TransientStoreError

    return isinstance(exc, (RunbookError, TransientStoreError, DatabaseUnavailable))


def tidy_logs() -> None:
    """Filter the console and the run-log (API) handlers. Idempotent."""
    import prefect.main  # noqa: F401 - configures Prefect's logging first

    loggers = [logging.getLogger(name) for name in ("", "prefect.flow_runs", "prefect.task_runs")]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if not any(isinstance(f, _TidyLogs) for f in handler.filters):
            handler.addFilter(_TidyLogs())


# Every flow module imports this one, so the child process that `runbooks serve` or a
# worker starts for each run gets the filter too, not only our own entry points.
tidy_logs()
