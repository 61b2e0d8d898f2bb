"""The incident texts, filled with what was measured: the four communication templates
(declaration, status update, resolution in Slack's mrkdwn; the customer notice as plain
text) and the post-incident report (markdown). Pure functions, no I/O, so each text can
be read and tested on its own.

What a person still has to decide (root cause beyond the symptom, prevention, service
credit) is written as a bracketed placeholder, never guessed.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import BaseModel

from tasks.notify import Severity
from tasks.report import utc

TO_DECIDE = "[to be completed at the review]"


class Event(BaseModel):
    """One line of the incident's timeline."""

    at: datetime
    source: str  # alert, receiver, incident, runbook, slack, pagerduty, person
    text: str


class Facts(BaseModel):
    """What the templates say about an incident; filled in as it runs."""

    id: str
    title: str
    severity: Severity
    service: str | None = None
    detected_at: datetime
    declared_at: datetime
    channel: str | None = None  # "#incident-20261206-001", or where updates went instead
    assigned: list[str] = []  # Slack mentions (<@U1>) or names
    dashboard_url: str | None = None
    alert_summary: str | None = None
    alert_name: str | None = None
    generator_url: str | None = None
    runbook: str | None = None  # its flow name
    runbook_purpose: str | None = None  # the first line of its docstring
    runbook_outcome: str | None = None  # succeeded, failed: <why>, not started: <why>
    found: str | None = None  # what the runbook established (e.g. "/health: timed out")
    acknowledged_by: str | None = None
    acknowledged_at: datetime | None = None
    escalated_to: list[str] = []
    resolved_at: datetime | None = None
    resolved_how: str | None = None  # "the alert resolved", "resolved by alice: ..."
    impact: list[str] = []  # measured lines: error rate peak, P95 ...


def hhmm(seconds: float) -> str:
    """[HH:MM] as the templates write durations (a minute at least, so 20 s is 00:01)."""
    minutes = max(1, round(seconds / 60)) if seconds > 0 else 0
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def span(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _bullets(lines: list[str], empty: str) -> str:
    return "\n".join(f"  • {line}" for line in lines) if lines else f"  • {empty}"


def root_cause(f: Facts) -> str:
    """What is known: the symptom and what the runbook found; the cause itself is for people."""
    parts = []
    if f.alert_summary:
        parts.append(f"Symptom: {f.alert_summary}.")
    if f.found:
        parts.append(f"Found by {f.runbook or 'the runbook'}: {f.found}.")
    return " ".join(parts) or "not identified yet"


def declaration(f: Facts, impact_now: list[str], next_update_minutes: float, how_to_ack: str) -> str:
    """Template 1: incident declared."""
    status = f"Investigating; runbook `{f.runbook}` started automatically" if f.runbook else "Investigating"
    return f""":warning: *INCIDENT DECLARED: {(f.service or f.title).upper()}*

*Incident*: {f.id}: {f.title}
*Severity*: {f.severity.value}
*Service*: {f.service or 'not named'}
*Detected*: {utc(f.detected_at)}
*Impact*:
{_bullets(impact_now, 'not measured yet')}

*Current Status*: {status}
*Slack Channel*: {f.channel or 'none (console and run log)'}
*Dashboard*: {f.dashboard_url or 'not configured'}
*Next Update*: In {next_update_minutes:g} minutes, and at each step of the runbook

*Assigned To*: {', '.join(f.assigned) or 'nobody on call is configured'}
{how_to_ack}"""


def update(f: Facts, now: datetime, status: str, actions: list[str], impact_now: list[str], eta: str) -> str:
    """Template 2: status update."""
    return f""":clock1: *INCIDENT UPDATE* - {now:%H:%M:%S} UTC ({f.id})

*Status*: {status}

*Root Cause* (if identified):
{root_cause(f)}

*Mitigation in Progress*:
{_bullets(actions, 'none yet')}

*Current Impact*:
{_bullets(impact_now, 'not measured')}

*ETA*: {eta}"""


def resolution(f: Facts, commander: str) -> str:
    """Template 3: resolved."""
    assert f.resolved_at is not None
    seconds = (f.resolved_at - f.detected_at).total_seconds()
    rca_by = f.resolved_at + timedelta(hours=24)
    return f""":white_check_mark: *INCIDENT RESOLVED* - {f.resolved_at:%H:%M:%S} UTC ({f.id})

*Duration*: {hhmm(seconds)} (from {f.detected_at:%H:%M:%S} to {f.resolved_at:%H:%M:%S} UTC, {span(seconds)})

*Root Cause*:
{root_cause(f)}

*Impact*:
{_bullets(f.impact, 'not measured')}

*Resolution*: {f.resolved_how or 'resolved'}

*What We'll Do*:
  • {TO_DECIDE}: preventive measures with owners and target dates

*RCA Meeting*: within 24 hours, by {rca_by:%Y-%m-%d %H:%M} UTC (to be scheduled)
Questions? Ping {commander}"""


def escalation(f: Facts, waited_seconds: float, to: list[str], target_seconds: float | None) -> str:
    target = f" (response target {span(target_seconds)})" if target_seconds else ""
    return (f":rotating_light: *ESCALATION* ({f.id}, {f.severity.value}): not acknowledged after "
            f"{span(waited_seconds)}{target}. Paging {', '.join(to)}.")


def customer_notice(date: datetime, start: datetime, end: datetime, what_happened: str, root_cause: str,
                    impact: str, resolution: str, reference: str | None = None,
                    contact: str | None = None) -> str:
    """Template 4: the customer notice, a draft for a person to complete and send."""
    return f"""Subject: [RESOLVED] Service Disruption - {date:%Y-%m-%d}

Dear Valued Customer,

We experienced a service disruption on {date:%Y-%m-%d} from {start:%H:%M:%S} to {end:%H:%M:%S} UTC.

WHAT HAPPENED:
{what_happened}

ROOT CAUSE:
{root_cause}

IMPACT ON YOUR ACCOUNT:
{impact}

RESOLUTION:
{resolution}

NEXT STEPS:
We will implement:

1. [prevention 1] - Target: [date]
2. [prevention 2] - Target: [date]

SERVICE CREDIT:
[X]% service credit where the disruption breached the SLA (see the month's SLO report).

APOLOGY:
We sincerely apologize for the disruption.
{f"Reference: {reference}" if reference else ""}
Contact: {contact or '[support contact]'}"""


def incident_notice(f: Facts, contact: str | None) -> str:
    """Template 4 for an incident that resolved."""
    end = f.resolved_at or f.declared_at
    seconds = (end - f.detected_at).total_seconds()
    what = f.alert_summary or f.title
    done = (f"Our automation ran the runbook {f.runbook} ({f.runbook_purpose or 'its documented steps'}); "
            f"it {f.runbook_outcome or 'ran'}.") if f.runbook else "Our engineers restored the service."
    return customer_notice(
        date=f.detected_at, start=f.detected_at, end=end,
        what_happened=f"{what} ({f.service or 'the service'}, detected by our monitoring at "
                      f"{f.detected_at:%H:%M:%S} UTC).",
        root_cause=f"{root_cause(f)} {TO_DECIDE}",
        impact=f"The disruption lasted {span(seconds)}. " + (" ".join(f"{line}." for line in f.impact)
                                                              if f.impact else "[requests affected]"),
        resolution=f"{done} The service was back at {end:%H:%M:%S} UTC ({f.resolved_how or 'resolved'}).",
        reference=f.id, contact=contact)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def post_incident_report(f: Facts, timeline: list[Event], evidence_md: str, runbook_report_md: str | None) -> str:
    """The post-incident report (the reference's template), with the generated timeline."""
    detected = f"{utc(f.detected_at)} - {f'Prometheus alert {f.alert_name}' if f.alert_name else 'declared by hand'}"
    response = (f"{utc(f.acknowledged_at)} - acknowledged by {f.acknowledged_by}" if f.acknowledged_at else
                f"{utc(f.declared_at)} - declared; not acknowledged"
                + (f", escalated to {', '.join(f.escalated_to)}" if f.escalated_to else ""))
    response += f"; runbook {f.runbook}: {f.runbook_outcome}" if f.runbook else ""
    resolved = f"{utc(f.resolved_at)} - {f.resolved_how}" if f.resolved_at else "not resolved yet"
    seconds = ((f.resolved_at or timeline[-1].at) - f.detected_at).total_seconds() if timeline else 0
    start = timeline[0].at if timeline else f.detected_at
    rows = [f"| {e.at:%H:%M:%S} | +{(e.at - start).total_seconds():.1f} | {e.source} | {_md(e.text)} |"
            for e in timeline]
    summary = f"{f.title} ({f.severity.value}, service {f.service or 'not named'})."
    if f.runbook:
        summary += f" The runbook {f.runbook} {f.runbook_outcome}."
    summary += f" Resolved: {f.resolved_how}." if f.resolved_at else " Still open."
    return f"""# Incident Report: {f.id}

## Summary
{summary}

## Timeline
- **Detection**: {detected}
- **Response**: {response}
- **Resolution**: {resolved}

| {start:%Y-%m-%d} (UTC) | since start (s) | source | event |
|---|---:|---|---|
{chr(10).join(rows)}

## Impact
- **Users Affected**: {TO_DECIDE}
- **Duration**: {span(seconds)} ({hhmm(seconds)})
- **Measured**: {'; '.join(f.impact) or 'nothing measured (no Prometheus configured)'}
- **Business Impact**: {TO_DECIDE}

## Root Cause
{root_cause(f)}

{TO_DECIDE}: the underlying cause.

## Resolution
{(f.resolved_how or 'not resolved yet').capitalize()}.{f' Runbook {f.runbook}: {f.runbook_outcome}.' if f.runbook else ''}

## Prevention
{TO_DECIDE}: action items with owners and due dates.

## Lessons Learned
{TO_DECIDE}

## Evidence
{evidence_md}
{f"{chr(10)}## Runbook report{chr(10)}{chr(10)}{_demote(runbook_report_md)}" if runbook_report_md else ""}"""


def _demote(markdown: str) -> str:
    """A report nested in the incident's: its headings one level down."""
    return "\n".join(("#" + line) if line.startswith("#") else line for line in markdown.splitlines())


def key_compromise_notice(key_prefix: str, owner: str, revoked_at: datetime, reason: str, accessed: list[str],
                          replacement: str, reference: str | None = None, contact: str | None = None) -> str:
    """API_KEY_COMPROMISE_NOTICE (and template 4's points): a draft for a person to send."""
    seen = "\n".join(f"- {line}" for line in accessed) or "- no use of the key was recorded"
    return f"""Subject: ACTION REQUIRED: Your API Key was Compromised

Dear {owner},

We detected suspicious activity on your API key {key_prefix}… and revoked it at
{revoked_at:%Y-%m-%d %H:%M:%S} UTC. Requests with it are now refused.

WHY:
{reason}

WHAT THE KEY WAS USED FOR (from our audit log):
{seen}

YOUR NEW KEY:
{replacement}

WHAT WE ASK OF YOU:
1. Replace the revoked key wherever it is configured, and rotate your other keys.
2. Tell us whether the activity above was yours, so we can confirm no data was accessed
   without your authority.
3. Check where the key may have leaked (repositories, CI logs, shared configuration).
{f"Reference: {reference}" if reference else ""}
Contact: {contact or '[support contact]'}"""
