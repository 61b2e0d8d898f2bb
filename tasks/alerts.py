"""Alertmanager's webhook payload, the `[alerts]` config and the routing of an alert to a
runbook: which deployment, with which parameters, at which severity, under which key.

Pure logic, no I/O: the receiver (deployments/receiver.py) does the HTTP and the
hand-over to Prefect.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from tasks.notify import Severity

# --- the payload Alertmanager posts (webhook_config, payload version "4") ----------------


class Alert(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = {}
    startsAt: datetime
    endsAt: datetime | None = None
    generatorURL: str = ""
    fingerprint: str = Field(min_length=1, max_length=64, pattern=r"^[0-9a-zA-Z]+$")


class WebhookPayload(BaseModel):
    """What Alertmanager sends; unknown fields are tolerated, as later versions add some."""

    model_config = ConfigDict(extra="ignore")

    version: Literal["4"]
    groupKey: str = ""
    truncatedAlerts: int = 0
    status: Literal["firing", "resolved"]
    receiver: str = ""
    groupLabels: dict[str, str] = {}
    commonLabels: dict[str, str] = {}
    commonAnnotations: dict[str, str] = {}
    externalURL: str = ""
    alerts: list[Alert] = Field(min_length=1)


# --- routes ------------------------------------------------------------------------------

_MATCHER = re.compile(r'^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*$')
_PLACEHOLDER = re.compile(r"\{\{\s*(labels|annotations)\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class Matcher(BaseModel):
    """`label op "value"` as Alertmanager writes matchers: = != =~ !~ (regexes anchored)."""

    label: str
    op: Literal["=", "!=", "=~", "!~"]
    value: str

    @classmethod
    def parse(cls, text: str) -> "Matcher":
        m = _MATCHER.match(text)
        if not m:
            raise ValueError(f'matcher {text!r} is not of the form label = "value" (or !=, =~, !~)')
        label, op, value = m.group(1), m.group(2), m.group(3).replace('\\"', '"').replace("\\\\", "\\")
        if op in ("=~", "!~"):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"matcher {text!r}: bad regex: {exc}") from None
        return cls(label=label, op=op, value=value)  # type: ignore[arg-type]

    def matches(self, labels: dict[str, str]) -> bool:
        got = labels.get(self.label, "")  # a missing label matches as "", as in Alertmanager
        if self.op == "=":
            return got == self.value
        if self.op == "!=":
            return got != self.value
        found = re.fullmatch(self.value, got) is not None
        return found if self.op == "=~" else not found


class Route(BaseModel):
    """One `[[alerts.routes]]` entry: the first route whose matchers all hold wins."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="shown in logs, metrics and the run's name")
    matchers: list[str] = Field(min_length=1, description='e.g. ["alertname = \\"ServiceDown\\""]')
    deployment: str | None = Field(None, pattern=r"^[^/\s]+/[^/\s]+$",
                                   description="the runbook, as flow-name/deployment-name; none: the incident "
                                               "is declared and people act")
    parameters: dict[str, Any] = Field(default_factory=dict,
                                       description='rendered from the alert, e.g. {service = "{{ labels.job }}"}')
    require_approval: bool = Field(False, description="the run waits for a person even though an alert started "
                                                      "it (passes auto_approve = false)")

    @field_validator("matchers")
    @classmethod
    def _parse(cls, value: list[str]) -> list[str]:
        for text in value:
            Matcher.parse(text)
        return value

    def parsed(self) -> list[Matcher]:
        return [Matcher.parse(t) for t in self.matchers]


class AlertsConfig(BaseModel):
    """The `[alerts]` section: how the receiver checks callers and where alerts go."""

    model_config = ConfigDict(extra="forbid")

    bearer_token: SecretStr | None = Field(None, description="callers send Authorization: Bearer <token>")
    basic_username: str | None = None
    basic_password: SecretStr | None = Field(None, description="or Basic auth with basic_username")
    max_body_bytes: int = Field(1 << 20, gt=0, description="larger bodies are refused with 413")
    incident_deployment: str = Field("incident-response/incident-response", pattern=r"^[^/\s]+/[^/\s]+$",
                                     description="every routed alert becomes a run of this deployment, "
                                                 "which runs the route's runbook")
    routes: list[Route] = Field(default_factory=list)

    @model_validator(mode="after")
    def _auth(self) -> "AlertsConfig":
        if (self.basic_username is None) != (self.basic_password is None):
            raise ValueError("basic_username and basic_password go together")
        if self.bearer_token is None and self.basic_password is None:
            raise ValueError("set bearer_token (or basic_username and basic_password): "
                             "the receiver accepts no unauthenticated alert")
        names = [r.name for r in self.routes]
        if len(names) != len(set(names)):
            raise ValueError("route names must be unique")
        return self


# --- routing -----------------------------------------------------------------------------

_SEVERITY = {
    "critical": Severity.CRITICAL, "page": Severity.CRITICAL, "sev-1": Severity.CRITICAL, "sev1": Severity.CRITICAL,
    "high": Severity.HIGH, "sev-2": Severity.HIGH, "sev2": Severity.HIGH, "error": Severity.HIGH,
    "warning": Severity.MEDIUM, "medium": Severity.MEDIUM, "sev-3": Severity.MEDIUM, "sev3": Severity.MEDIUM,
    "info": Severity.LOW, "low": Severity.LOW, "sev-4": Severity.LOW, "sev4": Severity.LOW,
}


def severity_of(labels: dict[str, str]) -> Severity:
    """The `severity` label as ours; missing or unknown counts as MEDIUM (worth a look)."""
    return _SEVERITY.get(labels.get("severity", "").strip().lower(), Severity.MEDIUM)


def render(value: Any, alert: Alert) -> Any:
    """Fill `{{ labels.x }}` and `{{ annotations.y }}` in strings (also inside lists and
    tables). One pass, no expressions: a label value that itself holds `{{ ... }}` is
    inserted as text and never evaluated. A missing label renders as ""."""
    if isinstance(value, str):
        source = {"labels": alert.labels, "annotations": alert.annotations}
        return _PLACEHOLDER.sub(lambda m: source[m.group(1)].get(m.group(2), ""), value)
    if isinstance(value, list):
        return [render(v, alert) for v in value]
    if isinstance(value, dict):
        return {k: render(v, alert) for k, v in value.items()}
    return value


class Routed(BaseModel):
    """An alert matched to its runbook: what the receiver hands over."""

    route: str
    deployment: str | None
    parameters: dict[str, Any]
    severity: Severity
    idempotency_key: str
    alert: Alert

    def incident_parameters(self) -> dict[str, Any]:
        """The parameters of its incident-response run, which runs the runbook."""
        return {"alert": self.alert.model_dump(mode="json"), "runbook": self.deployment,
                "runbook_parameters": self.parameters, "severity": self.severity.value, "route": self.route}


NO_RUNBOOK = "incident"  # stands for the runbook in the key of a route without one


def idempotency_key(deployment: str | None, alert: Alert) -> str:
    """One incident per alert and runbook. Prefect's unique index is (flow, key), not per
    deployment, so the runbook's deployment is part of it; Alertmanager's re-deliveries,
    repeat notifications and resolution keep fingerprint and startsAt, so they map to
    the same run."""
    return f"{deployment or NO_RUNBOOK}:{alert.fingerprint}:{alert.startsAt.isoformat()}"


def route(config: AlertsConfig, alert: Alert) -> Routed | None:
    """The first route whose matchers all hold, or None (unmatched: logged, not an error)."""
    for r in config.routes:
        if all(m.matches(alert.labels) for m in r.parsed()):
            parameters = render(r.parameters, alert)
            if r.require_approval:
                parameters["auto_approve"] = False
            return Routed(route=r.name, deployment=r.deployment, parameters=parameters,
                          severity=severity_of(alert.labels), idempotency_key=idempotency_key(r.deployment, alert),
                          alert=alert)
    return None
