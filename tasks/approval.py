"""Approval before destructive steps: the run pauses in Prefect and shows the evidence
gathered so far; a person answers in the UI with approve/approver/reason. Schedules
and drills pass `auto_approve=True`. Either way the decision goes into the report."""

from __future__ import annotations

from collections.abc import Callable

from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from tasks.errors import RunbookError
from tasks.report import RunReport

WAIT_SECONDS = 4 * 3600  # an unanswered request fails the run (nothing is changed)
POLL_SECONDS = 2  # the paused run looks for an answer this often (Prefect's default: 10 s)


class Approval(RunInput):
    """The form shown in the Prefect UI when a run waits for approval."""

    approve: bool = Field(False, title="Approve", description="On: go ahead. Off: decline (nothing changes).")
    approver: str = Field("", title="Approver", description="Your name; an approval without one is declined.")
    reason: str = Field("", title="Reason", description="Why, e.g. the incident and what you checked.")


class NotApproved(RunbookError):
    """The request was declined, left without a name, or not answered in time."""


def approve(run: RunReport, action: str, evidence: list[str], auto: bool,
            wait_seconds: int = WAIT_SECONDS, before_wait: Callable[[], None] | None = None) -> Approval:
    """Wait for a person to approve `action` (unless `auto`); record the decision.
    `before_wait` runs just before the run pauses (e.g. to notify people)."""
    if auto:
        decision = Approval(approve=True, approver="auto_approve", reason="scheduled or drill run")
    else:
        shown = "\n".join(f"- {line}" for line in evidence) or "- (no evidence gathered)"
        if before_wait:
            before_wait()
        with run.step("wait for approval") as step:
            step.detail = action
            try:
                decision = pause_flow_run(  # type: ignore[assignment]
                    wait_for_input=Approval.with_initial_data(
                        description=f"## Approve: {action}\n\n{shown}\n\n"
                                    "Tick **approve**, give your name and a reason."),
                    timeout=wait_seconds, poll_interval=POLL_SECONDS)
            except FlowPauseTimeout:
                raise NotApproved(f"nobody approved '{action}' within {wait_seconds}s; nothing changed") from None
    who = f"{decision.approver or 'nobody'}: {decision.reason or 'no reason given'}"
    run.figure("Approval", ("approved by " if decision.approve else "declined by ") + who)
    if not decision.approve or not decision.approver.strip():
        raise NotApproved(f"'{action}' was not approved ({who}); nothing changed")
    return decision
