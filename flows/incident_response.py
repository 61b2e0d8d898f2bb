"""Incident response: every routed alert runs through here. It declares the incident,
runs the alert's runbook as a subflow while people are kept informed and paged on time,
and ends with the resolution and the post-incident report."""

from __future__ import annotations

import inspect
import statistics
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, ValidationError

from flows._common import run_url
from tasks import incidents, notify
from tasks.alerts import Alert, severity_of
from tasks.concurrency import current_run
from tasks.config import Settings, load_settings
from tasks.errors import ConfigError, RunbookError
from tasks.incident_templates import (Facts, declaration, incident_notice, post_incident_report, resolution, span,
                                      update)
from tasks.notify import Severity
from tasks.prometheus import MetricsUnavailable, expression_of, percent
from tasks.report import RunReport, StepRecord, first_line, listen

PROJECT = Path(__file__).resolve().parent.parent
EVIDENCE_WINDOW = timedelta(hours=1)
LOG_LINES = 50


class IncidentOpen(RunbookError):
    """The incident did not resolve in time; it stays open for people."""


class IncidentResult(BaseModel):
    id: str | None
    status: str  # resolved, open, planned (dry run)
    severity: Severity
    title: str
    channel: str | None = None
    runbook: str | None = None
    runbook_outcome: str | None = None
    acknowledged_by: str | None = None
    escalated_to: list[str] = []
    detected_at: datetime
    resolved_at: datetime | None = None
    seconds_to_resolve: float | None = None


@flow(name="incident-response", log_prints=True)
def incident_response(title: str | None = None, severity: Severity | None = None, service: str | None = None,
                      runbook: str | None = None, runbook_parameters: dict[str, Any] | None = None,
                      alert: dict[str, Any] | None = None, route: str | None = None,
                      dry_run: bool = False) -> IncidentResult:
    """Run an incident from its declaration to its post-incident report.

    Use: the alert receiver starts it for every firing alert a route matches; start it
    by hand (with a title) for an incident no alert caught.
    Steps:
      1. declare it: id INC-YYYY-MM-DD-N, a Slack channel incident-yyyymmdd-nnn with the
         on-call people invited, the declaration posted (template 1);
      2. gather evidence: the alert, the service's recent logs;
      3. run the routed runbook as a subflow, posting a status update (template 2) as
         each of its steps ends;
      4. all along: take acknowledgements (the Slack button, `runbooks incident ack`),
         and escalate a CRITICAL or HIGH incident nobody acknowledged in time (backup,
         manager, PagerDuty);
      5. wait until the alert resolves (or a person resolves it: `runbooks incident
         resolve`), then post the resolution (template 3);
      6. publish the post-incident report (timeline, evidence, the runbook's report) and
         a draft customer notice (template 4) as artifacts.
    Without Slack configured, everything goes to the run log and the artifacts.

    Args:
        title: What is wrong, in a line; empty: from the alert.
        severity: CRITICAL, HIGH, MEDIUM or LOW; empty: from the alert's severity label.
        service: The service affected; empty: the runbook's `service` or the alert's job.
        runbook: The runbook to run, as its deployment `flow-name/deployment-name`.
        runbook_parameters: Parameters for the runbook, over its deployment's own.
        alert: The Alertmanager alert that started it (the receiver fills this in).
        route: The alert route that matched (shown in the report).
        dry_run: Say what would be declared and run; declare and change nothing.
    """
    alert = _alert(alert)
    settings = load_settings()
    params = dict(runbook_parameters or {})
    severity = severity or (severity_of(alert.labels) if alert else Severity.MEDIUM)
    service = service or params.get("service") or (alert.labels.get("job") if alert else None)
    title = (title or (_title(alert) if alert else "")).strip()
    if not title:
        raise ConfigError("an incident needs an alert or a title")
    detected = alert.startsAt if alert else datetime.now(timezone.utc)
    target, not_started = _find_runbook(runbook, params)
    if dry_run:
        return _plan(settings, title, severity, service, runbook, target, not_started, detected)

    log = get_run_logger()
    with RunReport("Incident", title) as run:
        with run.step("declare") as step:
            incident = _declare(settings, title, severity, service, alert, route, runbook, log)
            run.target = incident.record.id
            step.detail = f"{incident.record.id} in {incident.facts.channel or 'the run log'}"
        with incident.watching():
            with run.step("gather evidence") as step:
                logs = _service_logs(settings, service)
                step.detail = f"{len(logs)} log lines of {service}" if service else "no service named"
                _publish(f"# Evidence: {incident.record.id}\n\n{_evidence(settings, incident, alert, logs)}",
                         f"incident-evidence-{incident.record.id}", f"Evidence gathered for {incident.record.id}")
            report_md: list[str] = []
            if runbook and target:
                with run.step(f"run {runbook}") as step:
                    ok = _run_runbook(settings, incident, target[0], {**target[1], **params}, report_md)
                    step.detail = incident.facts.runbook_outcome or ""
            elif runbook:
                ok = False
                incident.facts.runbook_outcome = f"not started: {not_started}"
                incident.event("incident", f"runbook {runbook} not started: {not_started}")
                _post_update(settings, incident, "Investigating",
                             [f"runbook {runbook} could not start: {not_started}; a person must act"])
            else:
                ok = False
            with run.step("wait for resolution") as step:
                resolved = _await_resolution(settings, incident, alert is not None, ok)
                step.detail = incident.facts.resolved_how or "still open"
                step.outcome = "ok" if resolved else "failed"
        facts = incident.facts
        if resolved:
            facts.impact = _impact_over(settings, service, facts.detected_at, facts.resolved_at or _now())
            incident.say(resolution(facts, settings.incidents.commander), what="resolution")
            incident.event("incident", f"resolved: {facts.resolved_how}")
        with run.step("write the post-incident report"):
            evidence = _evidence(settings, incident, alert, logs)
            _publish(post_incident_report(facts, incident.timeline, evidence, report_md[-1] if report_md else None),
                     f"incident-report-{incident.record.id}", f"Post-incident report of {incident.record.id}")
            if resolved:
                _publish("# Customer notice (draft, not sent)\n\n```\n"
                         f"{incident_notice(facts, settings.incidents.support_contact)}\n```\n",
                         f"incident-notice-{incident.record.id}",
                         f"Customer notice for {incident.record.id} (draft, not sent)")
        seconds = (facts.resolved_at - facts.detected_at).total_seconds() if facts.resolved_at else None
        run.figure("Incident", f"{facts.id} ({severity.value})")
        run.figure("Channel", facts.channel or "run log only")
        run.figure("Runbook", f"{runbook}: {facts.runbook_outcome}" if runbook else "none")
        run.figure("Acknowledged", f"by {facts.acknowledged_by} at {facts.acknowledged_at:%H:%M:%S} UTC"
                   if facts.acknowledged_at else "no")
        run.figure("Escalated to", ", ".join(facts.escalated_to) or "nobody")
        run.figure("Detection to resolution", span(seconds) if seconds is not None else "not resolved")
        if not resolved:
            run.outcome = "open"
            raise IncidentOpen(f"{facts.id} is still open after {settings.incidents.resolve_timeout_minutes:g} min: "
                               f"{'the alert still fires' if alert else 'nobody resolved it'} "
                               f"(`runbooks incident resolve {facts.id}` once it is over)")
        run.outcome = "resolved"
        return IncidentResult(id=facts.id, status="resolved", severity=severity, title=title, channel=facts.channel,
                              runbook=runbook, runbook_outcome=facts.runbook_outcome,
                              acknowledged_by=facts.acknowledged_by, escalated_to=facts.escalated_to,
                              detected_at=facts.detected_at, resolved_at=facts.resolved_at,
                              seconds_to_resolve=seconds)


def _alert(value: dict[str, Any] | None) -> Alert | None:
    """The alert parameter as Alertmanager's alert, or an error naming the bad field."""
    if not value:
        return None
    try:
        return Alert.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"alert.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None


def _title(alert: Alert) -> str:
    name = alert.labels.get("alertname", "alert")
    summary = alert.annotations.get("summary") or alert.annotations.get("description") or ""
    return f"{name}: {summary}" if summary else f"{name} on {alert.labels.get('job', 'unknown job')}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _find_runbook(name: str | None, params: dict[str, Any]) -> tuple[tuple[Any, dict[str, Any]] | None, str]:
    """(the runbook's flow, its deployment's parameters), or None and why it cannot run.
    Not finding it does not stop the incident: people must still be told."""
    if not name:
        return None, ""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.flows import load_flow_from_entrypoint

    try:
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(name)
    except ObjectNotFound:
        return None, f"no deployment {name!r} on the Prefect server"
    except ValueError as exc:
        return None, f"{name!r}: {first_line(exc)} (expected flow-name/deployment-name)"
    file, _, func = (deployment.entrypoint or "").partition(":")
    path = next((p for p in (Path(file), Path.cwd() / file, PROJECT / file) if p.is_file()), None)
    if path is None or not func:
        return None, f"its entrypoint {deployment.entrypoint!r} is not a file here"
    try:
        return (load_flow_from_entrypoint(f"{path}:{func}"), dict(deployment.parameters or {})), ""
    except Exception as exc:  # noqa: BLE001 - any import failure: say which, go on with the incident
        return None, f"its entrypoint {deployment.entrypoint!r} did not load: {first_line(exc)}"


def _plan(settings: Settings, title: str, severity: Severity, service: str | None, runbook: str | None,
          target: Any, not_started: str, detected: datetime) -> IncidentResult:
    cfg = settings.incidents
    steps = cfg.escalation.get(severity, [])
    lines = [f"declare a {severity.value} incident: {title} (service {service or 'not named'}, "
             f"detected {detected:%Y-%m-%d %H:%M:%S} UTC)",
             ("create a Slack channel, invite " + (", ".join(cfg.on_call) or "nobody (no on_call configured)"))
             if notify.slack_configured(settings.notify) else "post to the run log (Slack is not configured)",
             f"run {runbook} as a subflow" if target else (f"runbook {runbook} could not run: {not_started}"
                                                         if runbook else "no runbook: people act"),
             "escalate unless acknowledged: " + ("; ".join(f"after {span(s.after_seconds)} to {', '.join(s.to)}"
                                                         for s in steps) or "never (not CRITICAL or HIGH)")]
    for line in lines:
        print(f"Plan: {line}")
    return IncidentResult(id=None, status="planned (dry run)", severity=severity, title=title, runbook=runbook,
                          detected_at=detected)


def _declare(settings: Settings, title: str, severity: Severity, service: str | None, alert: Alert | None,
             route: str | None, runbook: str | None, log: Any) -> incidents.Incident:
    """Claim the id, open the channel with the on-call people, post the declaration."""
    from prefect.client.orchestration import get_client

    cfg, slack = settings.incidents, settings.notify
    run_id, _, _ = current_run()
    now = _now()
    with get_client(sync_client=True) as client:
        record = incidents.claim(client, run_id or "no-run", title, severity, service, now)
        created = client.read_flow_run(run_id).created if run_id else None
    channel_id, channel = None, None
    if notify.slack_configured(slack):
        name = incidents.channel_name(cfg.channel_prefix, record.id)
        channel_id = notify.open_channel(slack, name, cfg.people(["on_call"]))
        channel = f"#{name}" if channel_id else f"{slack.slack_channel} (#{name} could not be created)"
    record.channel = channel
    facts = Facts(id=record.id, title=title, severity=severity, service=service,
                  detected_at=alert.startsAt if alert else min(created or now, now), declared_at=now, channel=channel,
                  assigned=[f"<@{p}>" for p in cfg.on_call], dashboard_url=cfg.dashboard(service),
                  alert_name=alert.labels.get("alertname") if alert else None,
                  alert_summary=(alert.annotations.get("summary") or alert.annotations.get("description"))
                  if alert else None,
                  generator_url=alert.generatorURL or None if alert else None,
                  runbook=runbook.split("/", 1)[0] if runbook else None)
    incident = incidents.Incident(cfg, slack, record, facts, channel_id,
                                  lambda: get_client(sync_client=True), log)
    if alert:
        incident.event("alert", f"{facts.alert_name or 'alert'} firing (Prometheus)"
                       + (f", route {route}" if route else ""), at=alert.startsAt)
    if created and alert:
        incident.event("receiver", "alert handed over to Prefect (incident run created)", at=created)
    elif created:
        incident.event("person", "incident run created by hand", at=created)
    incident.event("incident", f"{record.id} declared ({severity.value})", at=now)
    if channel_id:
        incident.event("slack", f"channel {channel} created, on call invited: {', '.join(cfg.on_call) or 'nobody'}")
    how = (f"Acknowledge with the button below or `runbooks incident ack {record.id} --by <name>`"
           if slack.slack_signing_secret else f"Acknowledge with `runbooks incident ack {record.id} --by <name>`")
    text = declaration(facts, _impact(settings, service), cfg.update_minutes, how)
    incident.say(text, incidents.ack_blocks(text, record.id) if slack.slack_signing_secret else None,
                 what="declaration")
    incident.save()
    return incident


def _post_update(settings: Settings, incident: incidents.Incident, status: str, actions: list[str],
                 eta: str = "unknown") -> None:
    """Template 2 in the channel, with the impact measured now."""
    incident.say(update(incident.facts, _now(), status, actions, _impact(settings, incident.facts.service), eta),
                 what="status update")


def _impact(settings: Settings, service: str | None) -> list[str]:
    if settings.prometheus is None or not service or service not in settings.services:
        return []
    cfg = settings.service(service)
    return incidents.measure_now(settings.prometheus, settings.error_rate(service), cfg.latency_promql(service))


def _impact_over(settings: Settings, service: str | None, start: datetime, end: datetime) -> list[str]:
    """The error-rate peak over the incident, from Prometheus."""
    if settings.prometheus is None or not service or service not in settings.services:
        return []
    errors = settings.error_rate(service)
    if errors is None:
        return []
    try:
        top = incidents.peak(settings.prometheus, errors.promql, start, max(end, start + timedelta(seconds=1)))
    except MetricsUnavailable as exc:
        return [f"Error rate peak: unknown ({first_line(exc)})"]
    return [f"Error rate peak: {percent(top)} (threshold {errors.threshold:.2%})" if top is not None else
            "Error rate: no requests answered while it lasted"]


def _service_logs(settings: Settings, service: str | None) -> list[str]:
    if not service or service not in settings.services:
        return []
    try:
        return settings.controller(service).logs(LOG_LINES)
    except Exception as exc:  # noqa: BLE001 - evidence, never a reason to stop
        return [f"(logs unavailable: {first_line(exc)})"]


def _evidence(settings: Settings, incident: incidents.Incident, alert: Alert | None, logs: list[str]) -> str:
    f = incident.facts
    out = []
    if alert:
        out += ["### The alert", "",
                f"- **{f.alert_name or 'alert'}** since {alert.startsAt:%Y-%m-%d %H:%M:%S} UTC",
                f"- labels: {', '.join(f'`{k}={v}`' for k, v in sorted(alert.labels.items()))}",
                *(f"- {k}: {v}" for k, v in sorted(alert.annotations.items())),
                f"- source: {alert.generatorURL or 'not given'}", ""]
        expr = expression_of(alert.generatorURL)
        if expr and settings.prometheus:
            end = f.resolved_at or _now()
            start = min(alert.startsAt, end - EVIDENCE_WINDOW)
            out += ["### The alert's expression in Prometheus", "",
                    incidents.expression_evidence(settings.prometheus, expr, start, end), ""]
        elif expr:
            out += [f"The alert's expression `{expr}` was not queried: no [prometheus] is configured.", ""]
    if logs:
        out += [f"### Recent logs of {f.service} (last {len(logs)} lines before the runbook)", "", "```",
                *(line[:300] for line in logs[-LOG_LINES:]), "```"]
    return "\n".join(out) or "nothing gathered"


def _run_runbook(settings: Settings, incident: incidents.Incident, runbook_flow: Any, params: dict[str, Any],
                 report_md: list[str]) -> bool:
    """The runbook as a subflow of this run; a status update after each of its steps."""
    f = incident.facts
    accepts = inspect.signature(runbook_flow.fn).parameters
    if "incident" in accepts:  # runbooks that write notices name the incident in them
        params.setdefault("incident", f.id)
    if "alerted_at" in accepts and f.alert_name:  # and measure from the alert
        params.setdefault("alerted_at", f.detected_at)
    eta_seconds = _typical_seconds(runbook_flow.name)
    started = _now()
    purpose = (runbook_flow.description or "").strip().splitlines()
    f.runbook_purpose = purpose[0].rstrip(".") if purpose else None
    incident.event("runbook", f"{runbook_flow.name} started with {params}")

    def eta() -> str:
        if eta_seconds is None:
            return "unknown (no earlier successful run to go by)"
        left = eta_seconds - (_now() - started).total_seconds()
        return f"about {span(max(left, 0))} (typical run: {span(eta_seconds)})"

    def on_step(event: str, report: RunReport, step: StepRecord | None) -> None:
        if event == "published":
            report_md.append(report.markdown())
            return
        assert step is not None
        if event == "step-started" and not step.name.startswith("wait for approval"):
            return
        if f.found is None and report.steps and report.steps[0].outcome != "running" and report.steps[0].detail:
            f.found = report.steps[0].detail
        if event == "step-started":
            incident.event("runbook", f"{step.name}: waiting ({step.detail})")
            status = f"Mitigating: waiting for a person to approve in Prefect ({run_url() or 'the runbook run'})"
        else:
            incident.event("runbook", f"{step.name}: {step.outcome}" + (f" ({step.detail})" if step.detail else ""))
            status = "Mitigating"
        actions = [f"{s.name}: {'done' if s.outcome == 'ok' else s.outcome}" + (f" ({s.detail})" if s.detail else "")
                   for s in report.steps]
        _post_update(settings, incident, status, actions, eta())

    with listen(on_step):
        try:
            state = runbook_flow(**params, return_state=True)
            error = "" if state.is_completed() else first_line(Exception(state.message or state.name))
        except Exception as exc:  # noqa: BLE001 - parameters it refuses: the incident goes on
            state, error = None, first_line(exc)
    if state is not None and not error:
        why = getattr(state.result(raise_on_failure=False), "why", None)
        if isinstance(why, str) and why:
            f.found = why
    outcome = report_md and _report_outcome(report_md[-1])
    f.runbook_outcome = (f"completed ({outcome})" if outcome else "completed") if not error else f"failed: {error}"
    incident.event("runbook", f"{runbook_flow.name} {f.runbook_outcome}")
    if error:
        _post_update(settings, incident, "Investigating: the runbook failed, a person must act",
                     [f"{runbook_flow.name}: {f.runbook_outcome}"])
    return not error


def _report_outcome(markdown: str) -> str | None:
    for line in markdown.splitlines():
        if line.startswith("**Outcome:**"):
            return line.removeprefix("**Outcome:**").strip()
    return None


def _typical_seconds(flow_name: str) -> float | None:
    """The median duration of the runbook's last successful runs (for the updates' ETA)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                         flow_run_filter=FlowRunFilter(state={"type": FlowRunFilterStateType(
                                             any_=[StateType.COMPLETED])}),
                                         sort=FlowRunSort.START_TIME_DESC, limit=5)
    except Exception:  # noqa: BLE001 - an estimate is a courtesy
        return None
    times = [r.total_run_time.total_seconds() for r in runs if r.total_run_time]
    return statistics.median(times) if times else None


def _await_resolution(settings: Settings, incident: incidents.Incident, has_alert: bool, runbook_ok: bool) -> bool:
    """Resolved when the alert resolves or a person says so; without an alert, when the
    runbook succeeded. Meanwhile an update every `update_minutes`."""
    f, cfg = incident.facts, settings.incidents
    if not has_alert and runbook_ok:
        incident.resolve(f"runbook {f.runbook} {f.runbook_outcome}", _now())
        return True

    def still_open() -> None:
        waiting = "the alert to resolve" if has_alert else "a person to resolve it"
        _post_update(settings, incident, "Monitoring" if runbook_ok else "Investigating",
                     [f"runbook {f.runbook}: {f.runbook_outcome}" if f.runbook else "no runbook",
                      f"waiting for {waiting}"])

    events = (incident.alert_resolved, incident.resolve_asked) if has_alert else (incident.resolve_asked,)
    if not incident.wait(*events, timeout_seconds=cfg.resolve_timeout_minutes * 60, on_idle=still_open):
        _post_update(settings, incident, "Open: not resolved in time, left to people",
                     [f"runbook {f.runbook}: {f.runbook_outcome}" if f.runbook else "no runbook"])
        return False
    if incident.resolve_asked.is_set():
        incident.resolve(incident.resolve_note or "resolved by a person", _now())
    else:
        ended = incident.alert_ended_at or _now()
        incident.resolve(f"the alert resolved at {ended:%H:%M:%S} UTC", ended)
    return True


def _publish(markdown: str, key: str, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=markdown, key=key.lower()[:100], description=description)
