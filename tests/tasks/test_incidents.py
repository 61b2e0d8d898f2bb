"""The incident config, ids, texts and PagerDuty events, without a running incident."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from tasks import incidents
from tasks.config import load_settings
from tasks.errors import ConfigError
from tasks.incident_templates import (TO_DECIDE, Event, Facts, customer_notice, declaration, hhmm, incident_notice,
                                      post_incident_report, resolution, root_cause, update)
from tasks.notify import Severity
from tasks.pagerduty import PagerDutyConfig, event_body, send_event

T0 = datetime(2026, 12, 6, 10, 30, 0, tzinfo=timezone.utc)


def _facts(**more) -> Facts:
    base = dict(id="INC-2026-12-06-3", title="ServiceDown on api", severity=Severity.CRITICAL, service="api",
                detected_at=T0, declared_at=T0 + timedelta(seconds=4), channel="#incident-20261206-003",
                assigned=["<@U1>"], alert_name="ServiceDown", alert_summary="api is down",
                runbook="service-restart", runbook_outcome="completed (recovered)", found="/health: timed out")
    return Facts(**{**base, **more})


def test_ids_channels_and_record_names():
    assert incidents.check_id(" inc-2026-12-06-12 ") == "INC-2026-12-06-12"
    assert incidents.channel_name("incident", "INC-2026-12-06-12") == "incident-20261206-012"
    assert incidents.record_name("INC-2026-12-06-1") == "runbooks-incident-2026-12-06-1"
    for bad in ("INC-2026-12-06", "INC-2026-12-06-0", "2026-12-06-1", "INC-2026-12-06-1; drop", "../x"):
        with pytest.raises(incidents.UnknownIncident, match="not an incident id"):
            incidents.check_id(bad)


def test_escalation_defaults_follow_the_response_targets_and_a_severity_given_replaces_only_its_own(write_config):
    cfg = incidents.IncidentsConfig()
    assert [(s.after_seconds, s.to) for s in cfg.escalation[Severity.CRITICAL]] == [
        (120, ["backup"]), (300, ["manager", "pagerduty"])]
    assert cfg.escalation[Severity.HIGH][0].after_seconds == 900
    assert cfg.response_target_seconds[Severity.MEDIUM] == 3600
    write_config("""
[incidents]
backup = ["U2"]
[[incidents.escalation.critical]]
after_seconds = 0
to = ["pagerduty"]
""")
    loaded = load_settings().incidents
    assert [s.to for s in loaded.escalation[Severity.CRITICAL]] == [["pagerduty"]]
    assert loaded.escalation[Severity.HIGH] == cfg.escalation[Severity.HIGH]  # kept its defaults
    assert loaded.people(["backup", "U9", "pagerduty", "manager"]) == ["U2", "U9"]


def test_escalation_steps_out_of_order_and_unknown_keys_are_refused(write_config):
    write_config("""
[[incidents.escalation.HIGH]]
after_seconds = 600
to = ["manager"]
[[incidents.escalation.HIGH]]
after_seconds = 60
to = ["backup"]
""")
    with pytest.raises(ConfigError, match="HIGH: steps must be in the order they happen"):
        load_settings()
    with pytest.raises(ValidationError):
        incidents.IncidentsConfig(on_cal=["typo"])


def test_the_templates_carry_the_measured_values():
    f = _facts()
    text = declaration(f, ["Error rate: 4.20% (threshold 0.10%)"], 5, "ack with the button")
    assert text.startswith(":warning: *INCIDENT DECLARED: API*")
    for part in ("*Severity*: CRITICAL", "*Detected*: 2026-12-06 10:30:00 UTC", "• Error rate: 4.20%",
                 "*Slack Channel*: #incident-20261206-003", "*Next Update*: In 5 minutes", "*Assigned To*: <@U1>",
                 "runbook `service-restart` started automatically"):
        assert part in text, part
    up = update(f, T0 + timedelta(minutes=1), "Mitigating", ["restart: done (pid 7)"], [], "about 30 s")
    assert "- 10:31:00 UTC (INC-2026-12-06-3)" in up and "• restart: done (pid 7)" in up and "• not measured" in up
    assert "Symptom: api is down. Found by service-restart: /health: timed out." in up
    done = resolution(_facts(resolved_at=T0 + timedelta(minutes=75, seconds=20), resolved_how="the alert resolved",
                             impact=["Error rate peak: 12.00%"]), "@ic")
    assert "*Duration*: 01:15 (from 10:30:00 to 11:45:20 UTC, 75 min)" in done
    assert "by 2026-12-07 11:45 UTC" in done and "Questions? Ping @ic" in done and TO_DECIDE in done
    assert hhmm(20) == "00:01" and hhmm(0) == "00:00" and hhmm(3600 * 25) == "25:00"
    assert root_cause(_facts(alert_summary=None, found=None)) == "not identified yet"


def test_post_incident_report_and_customer_notice():
    f = _facts(acknowledged_by="alice", acknowledged_at=T0 + timedelta(seconds=50),
               resolved_at=T0 + timedelta(minutes=3), resolved_how="the alert resolved at 10:33:00 UTC",
               impact=["Error rate peak: 9.00%"], runbook_purpose="Restart a service that is down or sick")
    timeline = [Event(at=T0, source="alert", text="ServiceDown firing"),
                Event(at=T0 + timedelta(seconds=50), source="person", text="acknowledged by alice | via cli"),
                Event(at=T0 + timedelta(minutes=3), source="alert", text="ServiceDown resolved")]
    report = post_incident_report(f, timeline, "### The alert\n- x", "# Service restart: api\n\n## Timeline")
    assert report.startswith("# Incident Report: INC-2026-12-06-3\n\n## Summary\nServiceDown on api (CRITICAL")
    assert "- **Response**: 2026-12-06 10:30:50 UTC - acknowledged by alice" in report
    assert "| 10:30:50 | +50.0 | person | acknowledged by alice \\| via cli |" in report  # a pipe kept in its cell
    assert "- **Duration**: 3 min (00:03)" in report and "## Evidence\n### The alert" in report
    assert "## Runbook report\n\n## Service restart: api\n\n### Timeline" in report
    notice = incident_notice(f, "support@example.com")
    assert notice.startswith("Subject: [RESOLVED] Service Disruption - 2026-12-06")
    assert "from 10:30:00 to 10:33:00 UTC" in notice and "lasted 3 min. Error rate peak: 9.00%." in notice
    assert "runbook service-restart (Restart a service that is down or sick)" in notice
    assert "Reference: INC-2026-12-06-3" in notice and "Contact: support@example.com" in notice
    assert "Contact: [support contact]" in customer_notice(T0, T0, T0, "a", "b", "c", "d")


def test_pagerduty_events_as_the_events_api_wants_them(pagerduty):
    cfg = PagerDutyConfig(routing_key="R0UTING", url=pagerduty.url)
    assert send_event(cfg, "trigger", "INC-1", summary="api down", severity=Severity.HIGH,
                      details={"service": "api"}, links=[{"href": "http://x", "text": "alert"}])
    assert send_event(cfg, "acknowledge", "INC-1")
    trigger, ack = [e["body"] for e in pagerduty.events]
    assert trigger["payload"]["severity"] == "error" and trigger["payload"]["source"] == "prefect-runbooks"
    assert trigger["payload"]["custom_details"] == {"service": "api"} and trigger["links"][0]["href"] == "http://x"
    assert ack == {"routing_key": "R0UTING", "event_action": "acknowledge", "dedup_key": "INC-1"}
    assert event_body(cfg, "trigger", "k", severity=Severity.LOW)["payload"]["severity"] == "info"


def test_a_refused_pagerduty_event_is_one_scrubbed_warning_and_5xx_is_tried_again(pagerduty, caplog, monkeypatch):
    monkeypatch.setattr("tasks.pagerduty._RETRY_PAUSES", (0.01, 0.01))
    cfg = PagerDutyConfig(routing_key="R0UTING", url=pagerduty.url)
    pagerduty.status = 400
    assert not send_event(cfg, "trigger", "INC-2", summary="x")
    assert len(pagerduty.events) == 1  # a 400 is not retried
    pagerduty.status = 503
    assert not send_event(cfg, "trigger", "INC-3", summary="x")
    assert len(pagerduty.events) == 4  # 1 + three tries of the 503
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and "HTTP 503" in warnings[1] and all("R0UTING" not in w for w in warnings)
