"""What every flow does around its steps: tell people when it starts waiting, fails or
succeeds, with the figures it measured and a link to the run."""

from __future__ import annotations

from tasks.config import Settings
from tasks.notify import Notification, Severity, send
from tasks.report import RunReport, first_line


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
