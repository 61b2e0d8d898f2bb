"""The alert path run for real: Debian's Prometheus scrapes the demo service with the
repository's rules, Debian's Alertmanager posts with the repository's config (waits made
short) to the receiver that `runbooks serve` runs beside its deployments, which hands the
alert to the Prefect server as an incident; the incident runs the service restart. The
service hangs, the alert fires, the incident is declared in Slack (a stand-in), exactly
one restart runs, the service is healthy again, the alert resolves and so does the
incident, with its post-incident report."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from demo.service import runbooks_section
from tests.conftest import free_port
from tests.e2e.conftest import (BIN, AlertPorts, alert_sections, alert_stack, alerts_section, run, wait_final,
                                wait_for, write_config)
from tests.slack_standin import running_standin

TOKEN = "e2e-receiver-token"


@pytest.fixture(scope="module")
def drill(e2e_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("alerts")
    api_port, ports = free_port(), AlertPorts()
    with running_standin() as slack:
        config = write_config(root / "runbooks.toml", e2e_database, root / "backups")
        config.write_text(config.read_text() + f"""
{runbooks_section(e2e_database, api_port, root, grace_seconds=1, ready_deadline_seconds=30, watch_seconds=1)}
""" + alert_sections(slack.url, ports) + alerts_section(TOKEN, "service-down", "service-restart/service-restart-api"))
        with alert_stack(root, config, api_port, TOKEN, ports,
                         ["service-restart/service-restart-api", "incident-response/incident-response"]) as stack:
            yield {**stack, "slack": slack}


def _runs(client: httpx.Client, flow: str) -> list[dict[str, Any]]:
    return client.post("/flow_runs/filter", json={"flows": {"name": {"any_": [flow]}}}).json()


def _alerts(prometheus: str, state: str) -> list[dict[str, Any]]:
    alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == "ServiceDown" and a["state"] == state]


def _artifact(client: httpx.Client, key: str) -> str:
    found = client.post("/artifacts/filter", json={"artifacts": {"key": {"any_": [key]}}}).json()
    assert found, f"no artifact {key}"
    return found[0]["data"]


def test_a_hanging_service_becomes_an_incident_that_restarts_it_and_resolves(drill):
    server, api, slack = drill["server"], drill["api"], drill["slack"]
    pid_file = drill["root"] / "api.pid"
    pid_before = pid_file.read_text().split()[0]
    assert httpx.post(f"{api}/admin/fault", json={"mode": "hang"}, timeout=5).status_code == 200
    fired = time.monotonic()

    with server.api() as client:
        incidents = wait_for(lambda: _runs(client, "incident-response"), 60, "the alert to start an incident")
        handed_over = time.monotonic() - fired
        assert len(incidents) == 1
        incident = incidents[0]
        params = incident["parameters"]
        assert params["runbook"] == "service-restart/service-restart-api" and params["route"] == "service-down"
        assert params["runbook_parameters"] == {"service": "api"} and params["severity"] == "CRITICAL"
        assert params["alert"]["labels"]["alertname"] == "ServiceDown"
        assert {"alert", "route:service-down", "severity:critical"} <= set(incident["tags"])
        assert incident["idempotency_key"].startswith("service-restart/service-restart-api:")

        # Someone acknowledges it from a terminal while the runbook runs.
        declared = wait_for(lambda: slack.calls("conversations.create"), 60, "the incident channel")
        listed = wait_for(lambda: (r := run([str(BIN / "runbooks"), "incident", "list"], drill["env"])).returncode == 0
                          and "INC-" in r.stdout and r, 30, "runbooks incident list")
        incident_id = next(w for w in listed.stdout.split() if w.startswith("INC-"))
        acked = run([str(BIN / "runbooks"), "incident", "ack", incident_id, "--by", "oncall-e2e"], drill["env"])
        assert acked.returncode == 0 and f"{incident_id} acknowledged by oncall-e2e" in acked.stdout, acked.stderr

        restarts = wait_for(lambda: _runs(client, "service-restart"), 60, "the restart subflow")
        assert len(restarts) == 1 and restarts[0]["parent_task_run_id"]  # a subflow of the incident
        final = wait_final(client, incident["id"], timeout=180)
        assert final["state_type"] == "COMPLETED", final["state"]
        assert pid_file.read_text().split()[0] != pid_before  # a new process
        assert httpx.get(f"{api}/health", timeout=5).status_code == 200  # answers again
        assert not _alerts(drill["prometheus"], "firing")
        assert len(_runs(client, "service-restart")) == 1 and len(_runs(client, "incident-response")) == 1
        report = _artifact(client, f"incident-report-{incident_id.lower()}")
        notice = _artifact(client, f"incident-notice-{incident_id.lower()}")
        evidence = _artifact(client, f"incident-evidence-{incident_id.lower()}")

    # Slack, in order: the channel, its on-call, the declaration, updates, the resolution.
    channel = declared[0]["name"]
    order = [(r["path"].rsplit("/", 1)[1], r["body"]) for r in slack.requests
             if r["body"].get("channel") in (None, slack.channels[channel]) or "name" in r["body"]]
    methods = [m for m, _ in order]
    assert methods[:3] == ["conversations.create", "conversations.invite", "chat.postMessage"], methods
    texts = [b["text"] for m, b in order if m == "chat.postMessage"]
    assert "INCIDENT DECLARED: API" in texts[0] and "*Severity*: CRITICAL" in texts[0]
    assert "Error rate:" in texts[0]  # measured in the real Prometheus
    updates = [t for t in texts if "INCIDENT UPDATE" in t]
    assert len(updates) >= 4 and any("restart: done" in t for t in updates)
    assert any("acknowledged* by oncall-e2e" in t for t in texts)
    assert "INCIDENT RESOLVED" in texts[-1] and "*Duration*:" in texts[-1]

    for event in ("ServiceDown firing (Prometheus), route service-down", "alert handed over to Prefect",
                  "declared (CRITICAL)", "restart: ok", "acknowledged by oncall-e2e via cli",
                  "ServiceDown resolved (Alertmanager)", "resolved: the alert resolved"):
        assert event in report, event
    assert "The alert's expression in Prometheus" in evidence and "up{job" in evidence
    assert "[RESOLVED] Service Disruption" in notice

    text = httpx.get(f"{drill['receiver']}/metrics", timeout=5).text
    firing = float(text.split('runbooks_alerts_received_total{status="firing"} ')[1].split()[0])
    assert firing >= 2, text  # Alertmanager posted the alert again while it fired: no second run
    assert 'runbooks_runs_created_total{deployment="service-restart/service-restart-api"} 1.0' in text
    assert 'runbooks_alerts_resolutions_total{outcome="incident_updated"} 1.0' in text
    out = drill["serve"].output()
    assert "Traceback" not in out and "xoxb-e2e-token" not in out, out[-3000:]
    print(f"alert to incident run created: {handed_over:.1f} s")
