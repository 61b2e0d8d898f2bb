"""Routing of Alertmanager alerts: matchers as Alertmanager writes them, parameters
rendered from labels without evaluating what a label holds, severities, the run key."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from tasks.alerts import Alert, AlertsConfig, Matcher, WebhookPayload, idempotency_key, render, route, severity_of
from tasks.notify import Severity


def alert(**labels: str) -> Alert:
    return Alert(status="firing", labels=labels, annotations={"summary": "api down"},
                 startsAt=datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=timezone.utc), fingerprint="a1b2c3")


def config(**route_settings) -> AlertsConfig:
    return AlertsConfig(bearer_token="t0ken", routes=[
        {"name": "down", "matchers": ['alertname = "ServiceDown"', 'env != "dev"'],
         "deployment": "service-restart/service-restart-api",
         "parameters": {"service": "{{ labels.job }}", "reason": "{{annotations.summary}} ({{ labels.missing }})"},
         **route_settings},
        {"name": "errors", "matchers": ['alertname =~ "(High|Medium)ErrorRate"', 'job !~ "batch-.*"'],
         "deployment": "service-restart/service-restart-api", "parameters": {"service": "{{ labels.job }}"}},
    ])


@pytest.mark.parametrize("text, labels, expected", [
    ('a = "x"', {"a": "x"}, True), ('a = "x"', {"a": "xy"}, False),
    ('a != "x"', {"a": "y"}, True), ('a != "x"', {}, True),
    ('a =~ "x|y"', {"a": "y"}, True), ('a =~ "x"', {"a": "xx"}, False),  # anchored
    ('a !~ "dev.*"', {"a": "prod"}, True), ('a !~ "dev.*"', {"a": "dev-1"}, False),
    ('a = ""', {}, True),  # a missing label is "", as in Alertmanager
    ('a = "say \\"hi\\""', {"a": 'say "hi"'}, True),
])
def test_matchers_behave_as_alertmanager_s(text, labels, expected):
    assert Matcher.parse(text).matches(labels) is expected


@pytest.mark.parametrize("bad", ['a == "x"', "a = x", '= "x"', 'a =~ "("'])
def test_a_bad_matcher_is_a_config_error_naming_it(bad):
    with pytest.raises(ValidationError, match="matcher"):
        AlertsConfig(bearer_token="t", routes=[{"name": "r", "matchers": [bad], "deployment": "f/d"}])


def test_first_matching_route_wins_and_renders_its_parameters():
    routed = route(config(), alert(alertname="ServiceDown", job="api", env="prod"))
    assert routed is not None and routed.route == "down"
    assert routed.parameters == {"service": "api", "reason": "api down ()"}
    assert routed.severity is Severity.MEDIUM  # no severity label
    assert route(config(), alert(alertname="ServiceDown", job="api", env="dev")) is None
    other = route(config(), alert(alertname="HighErrorRate", job="api", severity="page"))
    assert other is not None and other.route == "errors" and other.severity is Severity.CRITICAL
    assert route(config(), alert(alertname="HighErrorRate", job="batch-nightly")) is None


def test_a_label_holding_template_text_is_inserted_never_evaluated():
    hostile = "{{ annotations.summary }}{{labels.env}}${HOME}"
    routed = route(config(), alert(alertname="ServiceDown", job=hostile, env="prod"))
    assert routed is not None and routed.parameters["service"] == hostile
    assert render(["{{ labels.job }}", {"n": 3}], alert(job="x")) == ["x", {"n": 3}]


def test_require_approval_overrides_auto_approve():
    routed = route(config(require_approval=True, parameters={"auto_approve": True}),
                   alert(alertname="ServiceDown", job="api"))
    assert routed is not None and routed.parameters["auto_approve"] is False


@pytest.mark.parametrize("value, expected", [
    ("critical", Severity.CRITICAL), ("page", Severity.CRITICAL), ("SEV-1", Severity.CRITICAL),
    ("high", Severity.HIGH), ("sev-2", Severity.HIGH), ("warning", Severity.MEDIUM), ("SEV-3", Severity.MEDIUM),
    ("info", Severity.LOW), ("low", Severity.LOW), ("sev-4", Severity.LOW), ("bogus", Severity.MEDIUM),
])
def test_severity_aliases(value, expected):
    assert severity_of({"severity": value}) is expected


def test_the_run_key_names_deployment_fingerprint_and_start():
    a = alert(alertname="X")
    assert idempotency_key("f/d", a) == "f/d:a1b2c3:2026-12-01T10:00:00.123456+00:00"
    assert idempotency_key("f/d", a) != idempotency_key("f/other", a)
    later = a.model_copy(update={"startsAt": datetime(2026, 12, 2, tzinfo=timezone.utc)})
    assert idempotency_key("f/d", later) != idempotency_key("f/d", a)  # fired again: a new run


def test_a_route_without_a_runbook_declares_the_incident_alone():
    config = AlertsConfig(bearer_token="t", routes=[{"name": "backups", "matchers": ['alertname = "BackupTooOld"']}])
    routed = route(config, alert(alertname="BackupTooOld", severity="high"))
    assert routed is not None and routed.deployment is None
    assert routed.idempotency_key == "incident:a1b2c3:2026-12-01T10:00:00.123456+00:00"
    params = routed.incident_parameters()
    assert params["runbook"] is None and params["severity"] == "HIGH" and params["alert"]["fingerprint"] == "a1b2c3"


def test_config_needs_credentials_and_unique_route_names():
    with pytest.raises(ValidationError, match="bearer_token"):
        AlertsConfig(routes=[])
    with pytest.raises(ValidationError, match="go together"):
        AlertsConfig(basic_username="am")
    with pytest.raises(ValidationError, match="unique"):
        AlertsConfig(bearer_token="t", routes=[{"name": "r", "matchers": ['a = "1"'], "deployment": "f/d"}] * 2)


def test_the_payload_tolerates_unknown_fields_and_needs_version_4():
    body = {"version": "4", "status": "firing", "alerts": [
        {"status": "firing", "labels": {"alertname": "X"}, "startsAt": "2026-12-01T10:00:00.123456789Z",
         "endsAt": "0001-01-01T00:00:00Z", "fingerprint": "ff00", "newField": 1}], "someday": True}
    assert WebhookPayload.model_validate(body).alerts[0].fingerprint == "ff00"
    with pytest.raises(ValidationError):
        WebhookPayload.model_validate({**body, "version": "3"})
    with pytest.raises(ValidationError):
        WebhookPayload.model_validate({**body, "alerts": [{**body["alerts"][0], "fingerprint": ""}]})
