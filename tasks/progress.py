"""Progress of long steps: a Prefect progress artifact (seen in the UI) and, when the
terminal is interactive, a progress bar; otherwise a log line every 10 %."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any


def _log() -> Any:
    """The run's logger inside a flow or task run (shown in the UI), else a plain one."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("runbooks.progress")


class Progress:
    """Count units of work (bytes) against an estimated total (percent capped at 100)."""

    def __init__(self, description: str, total: float | None) -> None:
        self.description = description
        self.total = total if total and total > 0 else None
        self.done = 0.0
        self._t0 = self._last_push = time.monotonic()
        self._last_decile = -1
        self._artifact: Any = None
        self._bar: Any = None
        self._task: Any = None
        self._start_artifact()
        if sys.stderr.isatty():
            from rich.progress import Progress as Bar

            self._bar = Bar(transient=True)
            self._bar.start()
            self._task = self._bar.add_task(description, total=self.total)

    def _start_artifact(self) -> None:
        from prefect.context import TaskRunContext, FlowRunContext

        if TaskRunContext.get() is None and FlowRunContext.get() is None:
            return
        from prefect.artifacts import create_progress_artifact

        self._artifact = create_progress_artifact(progress=0.0, description=self.description)

    @property
    def percent(self) -> float:
        return min(100.0, 100.0 * self.done / self.total) if self.total else 0.0

    def advance(self, n: float) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        now = time.monotonic()
        if self._artifact is not None and now - self._last_push >= 1.0:
            self._last_push = now
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact, progress=self.percent)
        decile = int(self.percent // 10)
        # Only long steps log their progress; a 2-second dump needs no ten lines.
        if self._bar is None and self.total and decile > self._last_decile and now - self._t0 > 5:
            self._last_decile = decile
            _log().info("%s: %d%%", self.description, decile * 10)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._artifact is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact, progress=100.0)
            self._artifact = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
