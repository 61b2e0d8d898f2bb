"""Incidents: the `[incidents]` config, the incident record, and a declared incident
while its flow runs (where it posts, what happened when, who acknowledged, whom it
paged).

Where the state lives, and why:
* The record is a Prefect Variable `runbooks-incident-YYYY-MM-DD-N`. Variable names are
  unique on the server, so two incidents declared at the same moment (two receivers, two
  alerts) can never take the same id: the second creation fails and takes the next number.
* What people and Alertmanager tell a running incident (acknowledged, alert resolved,
  resolve it) are flow-run inputs on the incident's run: kept in Prefect's database (so
  nothing is lost while the run waits or restarts) and unique per key, so the first
  acknowledgement counts and a repeated resolution is a no-op.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks import notify
from tasks.errors import RunbookError
from tasks.incident_templates import Event, Facts, escalation, span
from tasks.notify import NotifySettings, Severity
from tasks.pagerduty import PagerDutyConfig, send_event
from tasks.prometheus import ErrorRate, MetricsUnavailable, PrometheusConfig, percent, query_range, query_value
from tasks.report import first_line

# Flow-run input keys (Prefect allows letters, digits and dashes).
ACK, ALERT_RESOLVED, RESOLVE = "incident-ack", "incident-alert-resolved", "incident-resolve"
RECORD_PREFIX = "runbooks-incident-"
ID_FORMAT = "INC-YYYY-MM-DD-N"
_ID = re.compile(r"INC-(\d{4})-(\d{2})-(\d{2})-([1-9]\d{0,5})")
ROLES = ("on_call", "backup", "manager")
PAGERDUTY = "pagerduty"


class EscalationStep(BaseModel):
    """Who is paged once an incident has gone unacknowledged this long."""

    model_config = ConfigDict(extra="forbid")

    after_seconds: float = Field(ge=0, description="since the declaration; 0 pages at once")
    to: list[str] = Field(min_length=1, description='roles ("backup", "manager", "on_call"), Slack user '
                                                    'ids, or "pagerduty"')


def _step(after: float, *to: str) -> EscalationStep:
    return EscalationStep(after_seconds=after, to=list(to))


class IncidentsConfig(BaseModel):
    """`[incidents]`: who is on call, when to escalate, where pages go."""

    model_config = ConfigDict(extra="forbid")

    on_call: list[str] = Field(default_factory=list, description="Slack user ids invited to every incident")
    backup: list[str] = Field(default_factory=list, description="Slack user ids of the backup on-call")
    manager: list[str] = Field(default_factory=list, description="Slack user ids of the escalation manager")
    commander: str = Field("@incident-commander", description="who the resolution tells people to ask")
    # Response targets to acknowledge, by severity: CRITICAL < 2 min, HIGH < 15 min,
    # MEDIUM < 1 h, LOW < 24 h.
    response_target_seconds: dict[Severity, float] = Field(default_factory=lambda: {
        Severity.CRITICAL: 120, Severity.HIGH: 900, Severity.MEDIUM: 3600, Severity.LOW: 86400})
    # Unacknowledged CRITICAL: backup after 2 min, manager after 5; HIGH: backup when
    # its 15 min target passes, manager 5 min later. MEDIUM and LOW do not page.
    escalation: dict[Severity, list[EscalationStep]] = Field(default_factory=lambda: {
        Severity.CRITICAL: [_step(120, "backup"), _step(300, "manager", PAGERDUTY)],
        Severity.HIGH: [_step(900, "backup"), _step(1200, "manager", PAGERDUTY)]})
    pagerduty: PagerDutyConfig | None = None
    dashboard_url: str | None = Field(None, description="shown in the declaration; $service is replaced")
    support_contact: str | None = Field(None, description="the customer notice's contact line")
    update_minutes: float = Field(5, gt=0, description="a status update at least this often while open")
    resolve_timeout_minutes: float = Field(240, gt=0, description="how long an incident waits for its "
                                           "alert to resolve (or a person) before its run fails, left open")
    poll_seconds: float = Field(2.0, gt=0, description="how often the run looks for acknowledgements")
    channel_prefix: str = Field("incident", pattern=r"^[a-z0-9][a-z0-9_-]{0,40}$")

    @field_validator("escalation", mode="before")
    @classmethod
    def _over_defaults(cls, value: Any) -> Any:
        """A severity given replaces its default steps; the others keep theirs ([] = none)."""
        if not isinstance(value, dict):
            return value
        merged: dict[Any, Any] = {k.value: v for k, v in cls.model_fields["escalation"].default_factory().items()}
        merged.update({str(k).upper(): v for k, v in value.items()})
        return merged

    @field_validator("escalation")
    @classmethod
    def _ordered(cls, value: dict[Severity, list[EscalationStep]]) -> dict[Severity, list[EscalationStep]]:
        for severity, steps in value.items():
            times = [s.after_seconds for s in steps]
            if times != sorted(times):
                raise ValueError(f"{severity.value}: steps must be in the order they happen (after_seconds rising)")
        return value

    def people(self, names: list[str]) -> list[str]:
        """Roles expanded into their Slack user ids; other names are ids already."""
        out: list[str] = []
        for name in names:
            for person in getattr(self, name) if name in ROLES else [] if name == PAGERDUTY else [name]:
                if person not in out:
                    out.append(person)
        return out

    def dashboard(self, service: str | None) -> str | None:
        return self.dashboard_url.replace("$service", service or "") if self.dashboard_url else None


class UnknownIncident(RunbookError):
    """No incident has that id."""


class IncidentRecord(BaseModel):
    """The incident as the server keeps it (the Variable's value)."""

    id: str
    flow_run_id: str
    title: str
    severity: Severity
    service: str | None = None
    status: Literal["open", "acknowledged", "resolved"] = "open"
    channel: str | None = None
    declared_at: datetime
    acknowledged_by: str | None = None
    resolved_at: datetime | None = None


def check_id(text: str) -> str:
    """`text` as an incident id, or an error naming the format."""
    value = text.strip().upper()
    if not _ID.fullmatch(value):
        raise UnknownIncident(f"{text!r} is not an incident id ({ID_FORMAT}, e.g. INC-2026-12-06-1)")
    return value


def record_name(incident_id: str) -> str:
    return RECORD_PREFIX + check_id(incident_id).removeprefix("INC-").lower()


def channel_name(prefix: str, incident_id: str) -> str:
    """`incident-20261206-001` for INC-2026-12-06-1."""
    year, month, day, n = _ID.fullmatch(check_id(incident_id)).groups()  # type: ignore[union-attr]
    return f"{prefix}-{year}{month}{day}-{int(n):03d}"


def _run_tag(flow_run_id: str) -> str:
    return f"flow-run-{flow_run_id}"


def claim(client: Any, flow_run_id: str, title: str, severity: Severity, service: str | None,
          now: datetime | None = None) -> IncidentRecord:
    """The incident of this flow run: the one it already declared (a retried run), or a
    new one under the day's next free number."""
    from prefect.client.schemas.actions import VariableCreate
    from prefect.exceptions import ObjectAlreadyExists

    mine = _filter(client, {"tags": {"all_": [_run_tag(flow_run_id)]}}, limit=1)
    if mine:
        return mine[0]
    now = now or datetime.now(timezone.utc)
    day = f"{now:%Y-%m-%d}"
    newest = _filter(client, {"name": {"like_": f"{RECORD_PREFIX}{day}-%"}}, limit=1)  # the day's highest
    number = 1 + max((int(r.id.rsplit("-", 1)[1]) for r in newest), default=0)
    for _ in range(1000):
        record = IncidentRecord(id=f"INC-{day}-{number}", flow_run_id=flow_run_id, title=title[:200],
                                severity=severity, service=service, declared_at=now)
        try:
            client.create_variable(VariableCreate(name=record_name(record.id), value=record.model_dump(mode="json"),
                                                  tags=["incident", _run_tag(flow_run_id)]))
            return record
        except ObjectAlreadyExists:
            number += 1  # declared by someone else a moment ago
    raise RunbookError(f"could not claim an incident id for {day} (1,000 attempts)")


def _filter(client: Any, where: dict[str, Any], limit: int) -> list[IncidentRecord]:
    response = client.request("POST", "/variables/filter", json={
        "variables": {**where, "operator": "and_"}, "limit": limit, "sort": "CREATED_DESC"})
    response.raise_for_status()
    out = []
    for variable in response.json():
        if variable["name"].startswith(RECORD_PREFIX) and isinstance(variable.get("value"), dict):
            try:
                out.append(IncidentRecord.model_validate(variable["value"]))
            except ValueError:
                continue  # not one of ours
    return out


def save(client: Any, record: IncidentRecord) -> None:
    from prefect.client.schemas.actions import VariableUpdate

    client.update_variable(VariableUpdate(name=record_name(record.id), value=record.model_dump(mode="json")))


def find(client: Any, incident_id: str) -> IncidentRecord:
    variable = client.read_variable_by_name(record_name(incident_id))
    if variable is None:
        raise UnknownIncident(f"no incident {check_id(incident_id)} (see `runbooks incident list`)")
    return IncidentRecord.model_validate(variable.value)


def recent(client: Any, limit: int = 20) -> list[IncidentRecord]:
    return _filter(client, {"tags": {"all_": ["incident"]}}, limit=limit)


def tell(client: Any, record: IncidentRecord, key: str, value: dict[str, Any], sender: str) -> bool:
    """Leave `value` under `key` for the incident's run; False when that key was said
    already (the first acknowledgement counts)."""
    try:
        client.create_flow_run_input(flow_run_id=record.flow_run_id, key=key, value=json.dumps(value),
                                     sender=sender)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 409:  # that key is taken: said before
            return False
        raise
    return True


# --- a declared incident, while its run goes on ------------------------------------------


class Incident:
    """The incident's channel, timeline and responders while its flow runs. A thread
    (`watching`) reads what people and Alertmanager tell the run and escalates on time."""

    def __init__(self, cfg: IncidentsConfig, slack: NotifySettings, record: IncidentRecord, facts: Facts,
                 channel_id: str | None, client_factory: Callable[[], Any],
                 log: logging.Logger | logging.LoggerAdapter[Any]) -> None:
        self.cfg, self.slack, self.record, self.facts = cfg, slack, record, facts
        self.channel_id = channel_id
        self._client = client_factory
        self.log = log
        self.timeline: list[Event] = []
        self._lock = threading.Lock()
        self.acknowledged = threading.Event()
        self.alert_resolved = threading.Event()
        self.resolve_asked = threading.Event()
        self.resolve_note: str | None = None
        self.alert_ended_at: datetime | None = None
        self.paged = False
        self.escalations_done = 0
        self.last_post = time.monotonic()
        self._seen: set[str] = set()

    # -- what happened -------------------------------------------------------------------

    def event(self, source: str, text: str, at: datetime | None = None) -> None:
        with self._lock:
            self.timeline.append(Event(at=at or datetime.now(timezone.utc), source=source, text=text))
            self.timeline.sort(key=lambda e: e.at)

    def say(self, text: str, blocks: list[dict[str, Any]] | None = None, what: str = "message") -> bool:
        """Post to the incident's channel (or Slack's default channel, when the incident's
        could not be made); always to the run log too."""
        self.log.info(text.replace("*", ""))
        self.last_post = time.monotonic()
        where = self.channel_id or (self.slack.slack_channel if notify.slack_configured(self.slack) else None)
        if where is None:
            return False
        posted = notify.post(self.slack, where, text, blocks)
        if not posted or what != "status update":  # updates follow the runbook's steps, already listed
            self.event("slack", f"{what} posted" if posted else f"{what} NOT posted (Slack failed)")
        return posted

    def save(self) -> None:
        """Keep the record in step with what happened (status, who acknowledged, when resolved)."""
        f, r = self.facts, self.record
        r.status = "resolved" if f.resolved_at else "acknowledged" if f.acknowledged_by else "open"
        r.acknowledged_by, r.resolved_at = f.acknowledged_by, f.resolved_at
        try:
            with self._client() as client:
                save(client, r)
        except Exception as exc:  # noqa: BLE001 - the record is a convenience, the run goes on
            self.log.warning(f"incident record {self.record.id} not updated: {exc}")

    # -- people and Alertmanager ---------------------------------------------------------

    def check_inputs(self) -> None:
        """Act on what was said to the run since the last look."""
        with self._client() as client:
            found = client.filter_flow_run_input(flow_run_id=self.record.flow_run_id, key_prefix="incident-",
                                                 limit=50, exclude_keys=self._seen)
        for item in sorted(found, key=lambda i: i.created or datetime.min.replace(tzinfo=timezone.utc)):
            self._seen.add(item.key)
            try:
                value = item.decoded_value if isinstance(item.decoded_value, dict) else {}
            except ValueError:
                value = {}
            at = item.created or datetime.now(timezone.utc)
            if item.key == ACK:
                self._acknowledged(str(value.get("by") or item.sender or "someone")[:80],
                                   str(value.get("via") or "api")[:20], at)
            elif item.key == ALERT_RESOLVED:
                ended = _time(value.get("endsAt")) or at
                self.alert_ended_at = ended
                self.event("alert", f"{self.facts.alert_name or 'alert'} resolved (Alertmanager)", at=ended)
                self.alert_resolved.set()
            elif item.key == RESOLVE:
                self.resolve_note = f"resolved by {value.get('by') or 'someone'}" + (
                    f": {value['note']}" if value.get("note") else "")
                self.event("person", self.resolve_note, at=at)
                self.resolve_asked.set()

    def _acknowledged(self, by: str, via: str, at: datetime) -> None:
        if self.acknowledged.is_set():
            return
        self.acknowledged.set()
        waited = (at - self.facts.declared_at).total_seconds()
        target = self.cfg.response_target_seconds.get(self.facts.severity)
        verdict = "" if target is None else (f", within the {span(target)} target" if waited <= target else
                                             f", after the {span(target)} target")
        self.facts.acknowledged_by, self.facts.acknowledged_at = by, at
        self.event("person", f"acknowledged by {by} via {via} after {span(waited)}{verdict}", at=at)
        self.say(f":eyes: *{self.record.id} acknowledged* by {by} ({via}) after {span(waited)}{verdict}.",
                 what="acknowledgement")
        if self.paged and self.cfg.pagerduty:
            self._page("acknowledge")
        self.save()

    def escalate_if_due(self, now: datetime | None = None) -> None:
        """Page the next people once their step's time has come and nobody acknowledged."""
        if self.acknowledged.is_set():
            return
        steps = self.cfg.escalation.get(self.facts.severity, [])
        waited = ((now or datetime.now(timezone.utc)) - self.facts.declared_at).total_seconds()
        while self.escalations_done < len(steps) and waited >= steps[self.escalations_done].after_seconds:
            step = steps[self.escalations_done]
            self.escalations_done += 1
            people = self.cfg.people(step.to)
            shown = [f"<@{p}>" for p in people] + [r for r in step.to if r in ROLES and not getattr(self.cfg, r)]
            if PAGERDUTY in step.to:
                shown.append("PagerDuty" if self.cfg.pagerduty else "PagerDuty (not configured)")
            self.facts.escalated_to += [s for s in shown if s not in self.facts.escalated_to]
            self.event("incident", f"not acknowledged after {span(waited)}: escalated to {', '.join(shown)}")
            if people and self.channel_id:
                notify.invite(self.slack, self.channel_id, people)
            self.say(escalation(self.facts, waited, shown, self.cfg.response_target_seconds.get(self.facts.severity)),
                     what="escalation")
            if PAGERDUTY in step.to and self.cfg.pagerduty:
                self._page("trigger")

    def _page(self, action: Literal["trigger", "acknowledge", "resolve"]) -> None:
        assert self.cfg.pagerduty is not None
        f = self.facts
        links = [{"href": f.generator_url, "text": "alert"}] if f.generator_url else None
        ok = send_event(self.cfg.pagerduty, action, f.id, summary=f"{f.id} {f.title}", severity=f.severity,
                        details={"service": f.service, "channel": f.channel, "runbook": f.runbook},
                        links=links, log=self.log)
        if action == "trigger" and ok:
            self.paged = True
        self.event("pagerduty", f"{action} {'sent' if ok else 'NOT delivered'}")

    def resolve(self, how: str, at: datetime) -> None:
        self.facts.resolved_at, self.facts.resolved_how = at, how
        if self.paged and self.cfg.pagerduty:
            self._page("resolve")
        self.save()

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Look for acknowledgements and escalate on time, in a thread, while the block runs."""
        import contextvars

        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    self.check_inputs()
                    self.escalate_if_due()
                except Exception as exc:  # noqa: BLE001 - a Prefect hiccup: look again next round
                    self.log.warning(f"incident {self.record.id}: could not read its inputs ({exc}); trying again")
                stop.wait(self.cfg.poll_seconds)

        context = contextvars.copy_context()  # the run's logger works in the thread
        thread = threading.Thread(target=context.run, args=(loop,), name=f"incident-{self.record.id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=30)
            try:
                self.check_inputs()  # what arrived at the very end
            except Exception:  # noqa: BLE001
                pass

    def wait(self, *events: threading.Event, timeout_seconds: float,
             on_idle: Callable[[], None] | None = None) -> bool:
        """Until one of `events` is set (True) or the timeout (False); `on_idle` whenever
        nothing was posted for `update_minutes`."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if any(e.is_set() for e in events):
                return True
            if on_idle and time.monotonic() - self.last_post >= self.cfg.update_minutes * 60:
                on_idle()
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        return any(e.is_set() for e in events)


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.year > 1 else None  # Alertmanager's "0001-01-01T00:00:00Z" means none


def ack_blocks(text: str, incident_id: str) -> list[dict[str, Any]]:
    """The declaration with an Acknowledge button (Slack posts the click to the receiver)."""
    return [{"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}},
            {"type": "actions", "block_id": "incident", "elements": [
                {"type": "button", "action_id": "incident_ack", "value": incident_id, "style": "primary",
                 "text": {"type": "plain_text", "text": "Acknowledge"}}]}]


# --- evidence ----------------------------------------------------------------------------


def measure_now(prom: PrometheusConfig | None, error_rate: ErrorRate | None, latency_promql: str | None) -> list[str]:
    """The service's error rate and P95 latency now, where Prometheus is configured."""
    if prom is None:
        return []
    out = []
    if error_rate is not None:
        try:
            out.append(f"Error rate: {percent(error_rate.read())} (threshold {error_rate.threshold:.2%})")
        except MetricsUnavailable as exc:
            out.append(f"Error rate: unknown ({first_line(exc)})")
    if latency_promql:
        try:
            p95 = query_value(prom, latency_promql)
            out.append("Latency: P95 " + ("no traffic" if p95 is None else f"{p95 * 1000:.0f} ms"))
        except MetricsUnavailable as exc:
            out.append(f"Latency: unknown ({first_line(exc)})")
    return out


def peak(prom: PrometheusConfig, promql: str, start: datetime, end: datetime) -> float | None:
    """The highest value of `promql` between start and end (None: no data)."""
    values = [v for s in query_range(prom, promql, start, end) for _, v in s.samples if v == v]
    return max(values) if values else None


def expression_evidence(prom: PrometheusConfig, promql: str, start: datetime, end: datetime) -> str:
    """The alert's expression over the window, per series: samples, first, lowest,
    highest and last value, and when it was last non-empty (markdown)."""
    try:
        series = query_range(prom, promql, start, end)
    except MetricsUnavailable as exc:
        return f"`{promql}`: not available ({first_line(exc)})"
    lines = [f"`{promql}` from {start:%H:%M:%S} to {end:%H:%M:%S} UTC "
             f"(values while the expression held, i.e. while the alert's condition was true):", ""]
    if not series:
        return "\n".join(lines + ["no samples: the condition did not hold in this window"])
    lines += ["| series | samples | first | lowest | highest | last | last seen (UTC) |", "|---|---:|---:|---:|---:|---:|---|"]
    for s in series[:20]:
        values = [v for _, v in s.samples]
        name = "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(s.labels.items())) + "}"
        last_seen = datetime.fromtimestamp(s.samples[-1][0], timezone.utc) if s.samples else None
        lines.append(f"| `{name}` | {len(values)} | {values[0]:g} | {min(values):g} | {max(values):g} | "
                     f"{values[-1]:g} | {last_seen:%H:%M:%S} |" if values else f"| `{name}` | 0 | | | | | |")
    if len(series) > 20:
        lines.append(f"\n{len(series) - 20} more series not shown")
    return "\n".join(lines)
