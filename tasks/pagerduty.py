"""Page people through PagerDuty's Events API v2: trigger when an incident escalates,
acknowledge and resolve as the incident does. One dedup_key per incident (its id), so a
repeated trigger is one PagerDuty incident, not several.

Like Slack, PagerDuty must never break a runbook: a failed event is one warning line
(the routing key scrubbed) and the caller carries on; 429 and 5xx are tried again.

    >>> cfg = PagerDutyConfig(routing_key="R0UTINGKEY")
    >>> send_event(cfg, "trigger", "INC-2026-12-06-1", summary="api is down", severity=Severity.CRITICAL)
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from tasks.notify import Severity

Action = Literal["trigger", "acknowledge", "resolve"]
_PD_SEVERITY = {Severity.CRITICAL: "critical", Severity.HIGH: "error", Severity.MEDIUM: "warning",
                Severity.LOW: "info", Severity.INFO: "info"}
_RETRY_PAUSES = (0.5, 2.0)


class PagerDutyConfig(BaseModel):
    """`[incidents.pagerduty]`: the integration (Events API v2) escalations page through."""

    model_config = ConfigDict(extra="forbid")

    routing_key: SecretStr = Field(description="the service integration's key (Events API v2)")
    url: str = Field("https://events.pagerduty.com/v2/enqueue", description="the Events API endpoint")
    source: str = Field("prefect-runbooks", description="shown as the event's source")
    timeout_seconds: float = Field(10.0, gt=0)


def event_body(cfg: PagerDutyConfig, action: Action, dedup_key: str, summary: str = "",
               severity: Severity = Severity.HIGH, details: dict[str, Any] | None = None,
               links: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The Events API v2 body: trigger carries a payload; acknowledge and resolve only the key."""
    body: dict[str, Any] = {"routing_key": cfg.routing_key.get_secret_value(), "event_action": action,
                            "dedup_key": dedup_key}
    if action == "trigger":
        body["payload"] = {"summary": summary[:1024], "source": cfg.source, "severity": _PD_SEVERITY[severity],
                           "timestamp": datetime.now(timezone.utc).isoformat(),
                           "custom_details": details or {}}
        if links:
            body["links"] = links
    return body


def send_event(cfg: PagerDutyConfig, action: Action, dedup_key: str, summary: str = "",
               severity: Severity = Severity.HIGH, details: dict[str, Any] | None = None,
               links: list[dict[str, str]] | None = None,
               log: logging.Logger | logging.LoggerAdapter[Any] | None = None) -> bool:
    """Send one event; True once PagerDuty accepted it (HTTP 202)."""
    log = log or logging.getLogger("runbooks.pagerduty")
    body = event_body(cfg, action, dedup_key, summary, severity, details, links)
    reason = ""
    for pause in (*_RETRY_PAUSES, None):
        try:
            response = httpx.post(cfg.url, json=body, timeout=cfg.timeout_seconds)
            if response.status_code == 202:
                return True
            reason = f"HTTP {response.status_code}: {response.text[:200]}"
            if response.status_code != 429 and response.status_code < 500:
                break  # a refused event (bad key, bad body) does not pass on a retry
        except httpx.HTTPError as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if pause is not None:
            time.sleep(pause)
    key = cfg.routing_key.get_secret_value()
    log.warning(f"PagerDuty {action} of {dedup_key} not delivered ({reason.replace(key, '***')}); "
                "the incident carries on.")
    return False
