"""The alert path run for real: Debian's Prometheus scrapes the demo service with the
repository's rules, Debian's Alertmanager posts with the repository's config (waits made
short) to the receiver that `runbooks serve` runs beside its deployments, which hands the
alert to the Prefect server as an incident; the incident runs the service restart. The
service hangs, the alert fires, the incident is declared in Slack (a stand-in), exactly
one restart runs, the service is healthy again, the alert resolves and so does the
incident, with its post-incident report."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from demo.service import runbooks_section
from tests.conftest import free_port, need
from tests.e2e.conftest import (BIN, Proc, alerts_section, base_env, run, spawn, start_server, wait_final, wait_for,
                                write_config)
from tests.slack_standin import running_standin

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
TOKEN = "e2e-receiver-token"


def _binary(name: str) -> str:
    path = shutil.which(name)
    need(path is not None, f"{name} is not installed (Debian: prometheus, prometheus-alertmanager)")
    return str(path)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _rules_overlay(path: Path) -> Path:
    """The repository's rules with `for:` cut to 2 s, as a test cannot wait a minute."""
    rules = yaml.safe_load((MONITORING / "rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "2s"
    path.write_text(yaml.safe_dump(rules))
    return path


def _alertmanager_overlay(path: Path, receiver_url: str, token_file: Path) -> Path:
    config = yaml.safe_load((MONITORING / "alertmanager.yml").read_text())
    config["route"].update(group_wait="1s", group_interval="2s", repeat_interval="2s")
    for sub in config["route"].get("routes", []):
        sub["group_wait"] = "1s"
    hook = config["receivers"][0]["webhook_configs"][0]
    hook["url"] = receiver_url
    hook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def drill(e2e_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    prometheus, alertmanager = _binary("prometheus"), _binary("prometheus-alertmanager")
    root = tmp_path_factory.mktemp("alerts")
    api_port, prom_port, am_port, receiver_port = free_port(), free_port(), free_port(), free_port()
    procs: list[Proc] = []
    with running_standin() as slack:
        config = write_config(root / "runbooks.toml", e2e_database, root / "backups")
        config.write_text(config.read_text() + f"""
{runbooks_section(e2e_database, api_port, root, grace_seconds=1, ready_deadline_seconds=30, watch_seconds=1)}
[prometheus]
url = "http://127.0.0.1:{prom_port}"

[notify]
slack_token = "xoxb-e2e-token"
slack_api_url = "{slack.url}"
slack_signing_secret = "e2e-signing-secret"

[incidents]
on_call = ["UONCALL"]
poll_seconds = 0.5
""" + alerts_section(TOKEN, "service-down", "service-restart/service-restart-api"))
        server = start_server(root / "prefect-home")
        try:
            env = base_env(root / "client", config, server.url)
            for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
                env.pop(name, None)  # slack_sdk would send loopback through a proxy
            subprocess.run([sys.executable, "-c", "from tasks.config import load_settings; "
                            "load_settings().controller('api').start()"], env=env, check=True, timeout=60)
            wait_for(lambda: _ready(f"http://127.0.0.1:{api_port}/ready"), 30, "the demo service")
            serve = spawn([str(BIN / "runbooks"), "serve", "--receiver-port", str(receiver_port)], env,
                          root / "serve.log", cwd=root)
            procs.append(serve)
            token = root / "token"
            token.write_text(TOKEN)
            am_config = _alertmanager_overlay(root / "alertmanager.yml",
                                              f"http://127.0.0.1:{receiver_port}/alerts", token)
            procs.append(spawn([alertmanager, f"--config.file={am_config}", f"--storage.path={root / 'am'}",
                                f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address=",
                                "--log.level=warn"], env, root / "alertmanager.log", cwd=root))
            prom_config = root / "prometheus.yml"
            prom_config.write_text(yaml.safe_dump({
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(_rules_overlay(root / "rules.yml"))],
                "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
                "scrape_configs": [{"job_name": "api",
                                    "static_configs": [{"targets": [f"127.0.0.1:{api_port}"]}]}],
            }))
            procs.append(spawn([prometheus, f"--config.file={prom_config}", f"--storage.tsdb.path={root / 'tsdb'}",
                                f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                               env, root / "prometheus.log", cwd=root))
            wait_for(lambda: _ready(f"http://127.0.0.1:{am_port}/-/ready"), 30, "alertmanager")
            wait_for(lambda: _ready(f"http://127.0.0.1:{prom_port}/-/ready"), 30, "prometheus")
            wait_for(lambda: "Serving " in serve.output(), 90, "runbooks serve")
            wait_for(lambda: _ready(f"http://127.0.0.1:{receiver_port}/healthz"), 30, "the receiver in serve")

            def registered() -> bool:
                with server.api() as client:
                    return all(client.get(f"/deployments/name/{name}").status_code == 200
                               for name in ("service-restart/service-restart-api", "incident-response/incident-response"))

            wait_for(registered, 60, "the deployments")
            yield {"server": server, "env": env, "root": root, "api": f"http://127.0.0.1:{api_port}",
                   "prometheus": f"http://127.0.0.1:{prom_port}", "receiver": f"http://127.0.0.1:{receiver_port}",
                   "serve": serve, "slack": slack}
        finally:
            for proc in reversed(procs):
                proc.stop()
            subprocess.run([sys.executable, "-c", "from tasks.config import load_settings; "
                            "load_settings().controller('api').stop()"], env=base_env(root / "client", config),
                           timeout=60)
            server.stop()


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
