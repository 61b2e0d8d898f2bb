"""The run report every flow publishes: a timeline of its steps (start, duration,
outcome) and the measured figures, as a Prefect markdown artifact.

    with RunReport("Backup", "orders") as run:
        with run.step("dump to store"):
            ...
        run.figure("Stored size", "12.3 MB")
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel


class StepRecord(BaseModel):
    name: str
    started_at: datetime
    seconds: float = 0.0
    outcome: str = "running"  # ok | failed | skipped
    detail: str = ""


ReportEvent = Literal["step-started", "step-ended", "published"]
Listener = Callable[[ReportEvent, "RunReport", "StepRecord | None"], None]
_LISTENERS: ContextVar[tuple[Listener, ...]] = ContextVar("runbooks_report_listeners", default=())


@contextmanager
def listen(callback: Listener) -> Iterator[None]:
    """Call `callback` for every step and report of the runs started inside this block
    (a runbook run as a subflow of an incident posts its progress this way). A failing
    listener is logged and never changes the run."""
    token = _LISTENERS.set(_LISTENERS.get() + (callback,))
    try:
        yield
    finally:
        _LISTENERS.reset(token)


def _tell(event: ReportEvent, report: "RunReport", step: "StepRecord | None") -> None:
    for callback in _LISTENERS.get():
        try:
            callback(event, report, step)
        except Exception as err:  # noqa: BLE001 - an onlooker must not break the runbook
            logging.getLogger("runbooks.report").warning("report listener failed: %s", first_line(err))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class RunReport:
    """Collects steps and figures; publishes the markdown on exit, success or not."""

    def __init__(self, title: str, target: str) -> None:
        self.title = title
        self.target = target
        self.started = time.monotonic()
        self.started_at = datetime.now(timezone.utc)
        self.steps: list[StepRecord] = []
        self.figures: dict[str, str] = {}
        self.outcome = "running"
        self.error: str | None = None

    def __enter__(self) -> "RunReport":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.outcome, self.error = "failed", first_line(exc)
        elif self.outcome == "running":
            self.outcome = "succeeded"
        try:
            self.publish()
        except Exception as err:  # noqa: BLE001 - a lost report must not change the run's outcome
            logging.getLogger("runbooks.report").warning("report for %s not published: %s",
                                                         self.target, first_line(err))
        _tell("published", self, None)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @contextmanager
    def step(self, name: str) -> Iterator[StepRecord]:
        record = StepRecord(name=name, started_at=datetime.now(timezone.utc))
        self.steps.append(record)
        t0 = time.monotonic()
        _tell("step-started", self, record)
        try:
            yield record
        except BaseException as exc:
            record.outcome, record.detail = "failed", record.detail or first_line(exc)
            raise
        else:
            if record.outcome == "running":
                record.outcome = "ok"
        finally:
            record.seconds = time.monotonic() - t0
            _tell("step-ended", self, record)

    def skip(self, name: str, why: str) -> None:
        record = StepRecord(name=name, started_at=datetime.now(timezone.utc), outcome="skipped", detail=why)
        self.steps.append(record)
        _tell("step-ended", self, record)

    def figure(self, name: str, value: Any) -> None:
        self.figures[name] = str(value)

    def markdown(self) -> str:
        lines = [f"# {self.title}: {self.target}", "",
                 f"**Outcome:** {self.outcome}  ",
                 f"**Started:** {self.started_at:%Y-%m-%d %H:%M:%S} UTC  ",
                 f"**Duration:** {self.elapsed:.1f} s"]
        if self.error:
            lines.append(f"\n**Error:** {self.error}")
        if self.figures:
            lines += ["", "## Figures", "", "| figure | value |", "|---|---|"]
            lines += [f"| {k} | {_cell(v)} |" for k, v in self.figures.items()]
        lines += ["", "## Timeline", "", "| step | start (UTC) | seconds | outcome | detail |",
                  "|---|---|---:|---|---|"]
        lines += [f"| {s.name} | {s.started_at:%H:%M:%S} | {s.seconds:.2f} | {s.outcome} | {_cell(s.detail)} |"
                  for s in self.steps]
        return "\n".join(lines) + "\n"

    def publish(self) -> None:
        """Attach the report to the current flow run (no-op outside a run)."""
        from prefect.artifacts import create_markdown_artifact
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is None:
            return
        key = re.sub(r"[^a-z0-9-]+", "-", f"{self.title}-{self.target}".lower()).strip("-")
        create_markdown_artifact(markdown=self.markdown(), key=key[:100],
                                 description=f"{self.title} of {self.target}: {self.outcome}")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def utc(when: datetime | None, missing: str = "unknown") -> str:
    """A time as reports write it: UTC to the second."""
    return f"{when.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC" if when else missing


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"
