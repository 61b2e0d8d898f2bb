"""The incident flow through Prefect, on the demo service under the process controller:
the Slack Web API and PagerDuty's Events API are local stand-ins that record what they
got; the runbook is the real service-restart, registered as a deployment on the test
server and run as a subflow."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from demo.service import runbooks_section
from flows.incident_response import incident_response
from tasks import incidents
from tasks.alerts import Alert
from tasks.config import load_settings
from tasks.notify import Severity
from tasks.probes import wait_until_ready
from tests.conftest import free_port


@pytest.fixture(scope="module")
def restart_deployment() -> str:
    """service-restart registered on the test server, as `runbooks serve` registers it."""
    from flows.service_restart import service_restart

    name = f"restart-api-{uuid.uuid4().hex[:6]}"
    service_restart.to_deployment(name=name, parameters={"service": "api"}).apply()
    return f"service-restart/{name}"


def _config(tmp_path, dsn: str, port: int, slack_url: str | None, pagerduty_url: str | None = None,
            escalation: str = "", extra: str = "") -> str:
    slack = f'[notify]\nslack_token = "xoxb-test-token"\nslack_api_url = "{slack_url}"\n' \
            'slack_signing_secret = "s1gning"\n' if slack_url else ""
    pd = f'[incidents.pagerduty]\nrouting_key = "R0UTINGKEY0123"\nurl = "{pagerduty_url}"\n' if pagerduty_url else ""
    service = runbooks_section(dsn, port, tmp_path, grace_seconds=1, ready_deadline_seconds=20, watch_seconds=1)
    return f"""
[databases.orders]
dsn = "{dsn}"
[stores.local]
kind = "local"
path = "{tmp_path / 'store'}"
{service}
{slack}
[incidents]
on_call = ["UONCALL"]
backup = ["UBACKUP"]
manager = ["UMANAGER"]
poll_seconds = 0.2
update_minutes = 60
{extra}
{escalation}
{pd}
"""


@pytest.fixture
def service(sample_db, tmp_path):
    """The demo service on a free port; stopped after the test."""
    port = free_port()
    started = []

    def start() -> str:
        ctl = load_settings().controller("api")
        ctl.start()
        started.append(ctl)
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, deadline_seconds=20, interval=0.2)
        return url

    yield port, start
    for ctl in started:
        ctl.stop()


def _alert(fingerprint: str, started: datetime | None = None, **labels: str) -> dict[str, Any]:
    """An alert as the receiver passes it (Alertmanager's fields, JSON)."""
    return Alert(status="firing", labels={"alertname": "ServiceDown", "job": "api", "severity": "critical", **labels},
                 annotations={"summary": f"api is down ({fingerprint})"},
                 startsAt=started or datetime.now(timezone.utc) - timedelta(seconds=30),
                 generatorURL="http://prometheus.invalid/graph?g0.expr=up+%3D%3D+0",
                 fingerprint=fingerprint).model_dump(mode="json")


class Background:
    """The incident flow in a thread (it waits for people and Alertmanager)."""

    def __init__(self, **kwargs: Any) -> None:
        self.state: Any = None
        self.thread = threading.Thread(target=self._run, kwargs=kwargs, daemon=True)
        self.thread.start()

    def _run(self, **kwargs: Any) -> None:
        self.state = incident_response(**kwargs, return_state=True)

    def join(self, timeout: float = 120) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the incident run did not end"
        return self.state


def _record(token: str, timeout: float = 60) -> incidents.IncidentRecord:
    """The incident whose title holds `token`, once declared."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            found = [r for r in incidents.recent(client, 200) if token in r.title]
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no incident declared for {token}")


def _tell(incident_id: str, key: str, **value: Any) -> bool:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return incidents.tell(client, incidents.find(client, incident_id), key, value, sender="test")


def _artifact(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no artifact {key}"
    return str(found[0].data)


def _wait(check, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_an_alert_is_declared_its_runbook_runs_and_it_resolves_with_a_report(
        sample_db, tmp_path, write_config, service, slack, restart_deployment):
    port, start = service
    write_config(_config(tmp_path, sample_db, port, slack.url))
    url = start()
    ctl = load_settings().controller("api")
    pid = ctl.status().pid
    httpx.post(f"{url}/admin/fault", json={"mode": "hang"}, timeout=5)
    fp = uuid.uuid4().hex[:16]
    run = Background(alert=_alert(fp), runbook=restart_deployment, runbook_parameters={"service": "api"},
                     route="service-down")
    record = _record(fp)
    assert record.severity == Severity.CRITICAL and record.service == "api"
    assert _tell(record.id, incidents.ACK, by="alice", via="cli")
    assert not _tell(record.id, incidents.ACK, by="bob", via="cli")  # the first acknowledgement counts
    _wait(lambda: any("INCIDENT UPDATE" in m["text"] and "wait until ready: done" in m["text"]
                      for m in slack.calls("chat.postMessage")), 90, "the restart's updates")
    _wait(lambda: ctl.status().pid not in (None, pid), 60, "a new process")
    assert _tell(record.id, incidents.ALERT_RESOLVED, endsAt=datetime.now(timezone.utc).isoformat())
    state = run.join()
    assert state.is_completed(), state.message
    result = state.result()
    assert result.status == "resolved" and result.acknowledged_by == "alice" and result.escalated_to == []
    assert result.runbook_outcome.startswith("completed (recovered")

    (created,) = slack.calls("conversations.create")
    channel = created["name"]
    _, year, month, day, number = record.id.split("-")
    assert channel == f"incident-{year}{month}{day}-{int(number):03d}"
    assert slack.calls("conversations.invite")[0]["users"] == "UONCALL"
    posts = [m for m in slack.calls("chat.postMessage") if m["channel"] == slack.channels[channel]]
    others = [m for m in slack.calls("chat.postMessage") if m not in posts]
    assert {m["channel"] for m in others} == {"#ops-alerts"}  # the runbook's own notices, as ever
    texts = [m["text"] for m in posts]
    assert "INCIDENT DECLARED: API" in texts[0] and "*Severity*: CRITICAL" in texts[0]
    assert f"*Slack Channel*: #{channel}" in texts[0] and "<@UONCALL>" in texts[0]
    assert posts[0]["blocks"][1]["elements"][0]["value"] == record.id  # the Acknowledge button
    updates = [t for t in texts if "INCIDENT UPDATE" in t]
    assert any("restart: done" in t for t in updates) and any("/health: no answer" in t for t in updates)
    assert any("acknowledged* by alice" in t for t in texts)
    resolved = [t for t in texts if "INCIDENT RESOLVED" in t]
    assert len(resolved) == 1 and "*Duration*: 00:0" in resolved[0]
    assert texts.index(resolved[0]) == len(texts) - 1  # declaration first, resolution last

    report = _artifact(f"incident-report-{record.id.lower()}")
    assert report.startswith(f"# Incident Report: {record.id}")
    for event in ("ServiceDown firing", "declared (CRITICAL)", "restart: ok", "acknowledged by alice via cli",
                  "service-restart completed (recovered)", "ServiceDown resolved", "resolved: the alert resolved"):
        assert event in report, event
    assert "## Runbook report" in report and "### Timeline" in report  # the restart's own, nested
    assert "xoxb-test-token" not in report
    notice = _artifact(f"incident-notice-{record.id.lower()}")
    assert "[RESOLVED] Service Disruption" in notice and f"Reference: {record.id}" in notice
    with __import__("prefect").get_client(sync_client=True) as client:
        assert incidents.find(client, record.id).status == "resolved"


def test_unacknowledged_critical_incident_escalates_and_pages(sample_db, tmp_path, write_config, slack, pagerduty):
    write_config(_config(tmp_path, sample_db, free_port(), slack.url, pagerduty.url, escalation="""
[[incidents.escalation.CRITICAL]]
after_seconds = 0.5
to = ["backup"]
[[incidents.escalation.CRITICAL]]
after_seconds = 1.0
to = ["manager", "pagerduty"]
"""))
    token = uuid.uuid4().hex[:8]
    run = Background(title=f"payments are failing {token}", severity=Severity.CRITICAL, service="api")
    record = _record(token)
    _wait(lambda: len(pagerduty.events) >= 1, 30, "the page")
    assert _tell(record.id, incidents.RESOLVE, by="carol", note="upstream fixed")
    state = run.join()
    assert state.is_completed(), state.message
    assert state.result().escalated_to == ["<@UBACKUP>", "<@UMANAGER>", "PagerDuty"]

    invited = [c["users"] for c in slack.calls("conversations.invite")]
    assert invited == ["UONCALL", "UBACKUP", "UMANAGER"]
    escalations = [m["text"] for m in slack.calls("chat.postMessage") if "ESCALATION" in m["text"]]
    assert len(escalations) == 2 and "Paging <@UBACKUP>" in escalations[0]
    assert "Paging <@UMANAGER>, PagerDuty" in escalations[1] and "response target 2 min" in escalations[0]
    trigger, resolve = [e["body"] for e in pagerduty.events]
    assert trigger["routing_key"] == "R0UTINGKEY0123" and trigger["event_action"] == "trigger"
    assert trigger["dedup_key"] == record.id and trigger["payload"]["severity"] == "critical"
    assert trigger["payload"]["summary"] == f"{record.id} payments are failing {token}"
    assert resolve == {"routing_key": "R0UTINGKEY0123", "event_action": "resolve", "dedup_key": record.id}
    report = _artifact(f"incident-report-{record.id.lower()}")
    assert "escalated to <@UMANAGER>, PagerDuty" in report and "resolved by carol: upstream fixed" in report
    assert "R0UTINGKEY0123" not in report


def test_acknowledged_in_time_nobody_is_paged(sample_db, tmp_path, write_config, slack, pagerduty):
    write_config(_config(tmp_path, sample_db, free_port(), slack.url, pagerduty.url, escalation="""
[[incidents.escalation.HIGH]]
after_seconds = 1
to = ["backup", "pagerduty"]
"""))
    token = uuid.uuid4().hex[:8]
    run = Background(title=f"slow checkout {token}", severity=Severity.HIGH)
    record = _record(token)
    assert _tell(record.id, incidents.ACK, by="dave", via="api")
    time.sleep(1.5)  # past the escalation step: it must not fire once acknowledged
    assert _tell(record.id, incidents.RESOLVE, by="dave")
    state = run.join()
    assert state.is_completed() and state.result().escalated_to == []
    assert pagerduty.events == []
    assert [c["users"] for c in slack.calls("conversations.invite")] == ["UONCALL"]
    assert any("within the 15 min target" in m["text"] for m in slack.calls("chat.postMessage"))


def test_concurrent_declarations_get_distinct_ids():
    from prefect.client.orchestration import get_client

    day = datetime(2031, 5, 17, 12, tzinfo=timezone.utc)  # a day no other test declares on
    claimed: list[str] = []

    def declare(i: int) -> None:
        with get_client(sync_client=True) as client:
            claimed.append(incidents.claim(client, str(uuid.uuid4()), f"t{i}", Severity.LOW, None, day).id)

    threads = [threading.Thread(target=declare, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed, key=lambda i: int(i.rsplit("-", 1)[1])) == [f"INC-2031-05-17-{n}" for n in range(1, 9)]


def test_a_retried_run_keeps_its_incident():
    from prefect.client.orchestration import get_client

    run_id = str(uuid.uuid4())
    with get_client(sync_client=True) as client:
        first = incidents.claim(client, run_id, "once", Severity.LOW, None)
        again = incidents.claim(client, run_id, "once", Severity.LOW, None)
    assert first.id == again.id


def test_without_slack_everything_goes_to_the_run_log_and_artifacts(sample_db, tmp_path, write_config, caplog):
    write_config(_config(tmp_path, sample_db, free_port(), slack_url=None))
    token = uuid.uuid4().hex[:8]
    run = Background(title=f"disk filling {token}", severity=Severity.MEDIUM, runbook="no-such/deployment")
    record = _record(token)
    assert _tell(record.id, incidents.RESOLVE, by="erin")
    state = run.join()
    assert state.is_completed(), state.message
    assert state.result().runbook_outcome == "not started: no deployment 'no-such/deployment' on the Prefect server"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "INCIDENT DECLARED" in logged and "could not start" in logged and "Slack Channel: none" in logged
    report = _artifact(f"incident-report-{record.id.lower()}")
    assert "runbook no-such not started" in report or "not started: no deployment" in report


def test_an_alert_that_never_resolves_leaves_the_incident_open(sample_db, tmp_path, write_config, slack):
    write_config(_config(tmp_path, sample_db, free_port(), slack.url, extra="resolve_timeout_minutes = 0.05"))
    fp = uuid.uuid4().hex[:16]
    state = incident_response(alert=_alert(fp, severity="warning"), return_state=True)
    assert state.is_failed() and "still open" in state.message and "the alert still fires" in state.message
    record = _record(fp)
    assert record.status == "open" and record.severity == Severity.MEDIUM
    texts = [m["text"] for m in slack.calls("chat.postMessage")]
    assert "Open: not resolved in time" in texts[-1] and not any("INCIDENT RESOLVED" in t for t in texts)
    assert "Still open." in _artifact(f"incident-report-{record.id.lower()}")

    # Its run has ended: a person resolving it later updates the record itself.
    from typer.testing import CliRunner

    from deployments.cli import app

    done = CliRunner().invoke(app, ["incident", "resolve", record.id, "--by", "gina"])
    assert done.exit_code == 0 and "marked resolved; its run had ended (Failed)" in done.output, done.output
    assert _record(fp).status == "resolved"
    again = CliRunner().invoke(app, ["incident", "resolve", record.id, "--by", "gina"])
    assert again.exit_code != 0 and "resolved already" in str(again.exception)


def test_a_channel_slack_refuses_falls_back_to_the_default_channel(sample_db, tmp_path, write_config, slack):
    write_config(_config(tmp_path, sample_db, free_port(), slack.url))
    slack.fail_methods["conversations.create"] = "missing_scope"
    token = uuid.uuid4().hex[:8]
    run = Background(title=f"queue backlog {token}", severity=Severity.LOW)
    record = _record(token)
    assert _tell(record.id, incidents.RESOLVE, by="frank")
    assert run.join().is_completed()
    posts = slack.calls("chat.postMessage")
    assert posts and {m["channel"] for m in posts} == {"#ops-alerts"}
    assert "could not be created" in posts[0]["text"]


def test_dry_run_declares_nothing(sample_db, tmp_path, write_config, slack, caplog):
    write_config(_config(tmp_path, sample_db, free_port(), slack.url))
    token = uuid.uuid4().hex[:8]
    result = incident_response(title=f"dry {token}", severity=Severity.CRITICAL, dry_run=True)
    assert result.status == "planned (dry run)" and result.id is None
    assert slack.requests == []
    out = "\n".join(r.getMessage() for r in caplog.records)
    assert "Plan: escalate unless acknowledged: after 2 min to backup; after 5 min to manager, pagerduty" in out
    with pytest.raises(AssertionError):
        _record(token, timeout=1)


def test_an_incident_needs_an_alert_or_a_title_and_a_malformed_alert_is_refused(sample_db, tmp_path, write_config):
    write_config(_config(tmp_path, sample_db, free_port(), slack_url=None))
    state = incident_response(return_state=True)
    assert state.is_failed() and "needs an alert or a title" in state.message
    state = incident_response(alert={"labels": {"alertname": "X"}, "status": "firing"}, return_state=True)
    assert state.is_failed() and "alert.startsAt: Field required" in state.message
