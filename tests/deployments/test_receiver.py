"""The alert receiver over real HTTP (uvicorn on loopback) against the session's Prefect
server: Alertmanager's payloads become exactly one run per alert; bad requests get the
answer Alertmanager must see and reach no runbook."""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from pydantic import SecretStr

from deployments.receiver import ENDPOINT, SLACK_ENDPOINT, create_app
from tasks.alerts import AlertsConfig
from tests.conftest import free_port
from tests.e2e.conftest import alerts_section

TOKEN = "s3cret-token"


RUNBOOK = "service-restart/service-restart-api"  # the routes' runbook: the incident runs it, not the receiver


@pytest.fixture(scope="module")
def deployment() -> str:
    """The incident deployment, on the session server with the incident flow's own
    parameter schema (nothing serves it: its runs stay scheduled)."""
    from flows.incident_response import incident_response

    name = f"incident-{uuid.uuid4().hex[:6]}"
    incident_response.to_deployment(name=name).apply()
    return f"incident-response/{name}"


def alerts_config(deployment: str, **extra) -> AlertsConfig:
    extra.setdefault("incident_deployment", deployment)
    return AlertsConfig(bearer_token=TOKEN, basic_username="am", basic_password="pw", routes=[
        {"name": "down", "matchers": ['alertname = "ServiceDown"'], "deployment": RUNBOOK,
         "parameters": {"service": "{{ labels.job }}", "why": "{{ annotations.summary }}"}},
        {"name": "missing", "matchers": ['alertname = "Orphan"'], "deployment": "receiver-test/not-there"},
    ], **extra)


@contextmanager
def receiver(config: AlertsConfig, api_url: str | None = None, signing_secret: str | None = None) -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL

    port = free_port()
    app = create_app(config, api_url or PREFECT_API_URL.value(),
                     slack_signing_secret=SecretStr(signing_secret) if signing_secret else None)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the receiver did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def payload(fingerprint: str = "fp1", status: str = "firing", **labels: str) -> dict:
    labels = {"alertname": "ServiceDown", "job": "api", **labels}
    return {"version": "4", "status": status, "receiver": "runbooks", "groupKey": "{}:{}", "truncatedAlerts": 0,
            "groupLabels": {}, "commonLabels": labels, "commonAnnotations": {}, "externalURL": "http://am",
            "alerts": [{"status": status, "labels": labels, "annotations": {"summary": "api is down"},
                        "startsAt": "2026-12-01T10:00:00.5Z", "endsAt": "0001-01-01T00:00:00Z",
                        "generatorURL": "http://prom/graph", "fingerprint": fingerprint}]}


BEARER = {"Authorization": f"Bearer {TOKEN}"}


def runs_with_key(deployment: str, key_prefix: str) -> list[dict]:
    """The incident runs of `deployment` whose key starts `<runbook>:<key_prefix>`."""
    from prefect.settings import PREFECT_API_URL

    runs = httpx.post(f"{PREFECT_API_URL.value()}/flow_runs/filter",
                      json={"deployments": {"name": {"any_": [deployment.split("/", 1)[1]]}}, "limit": 200}).json()
    return [r for r in runs if (r.get("idempotency_key") or "").startswith(f"{RUNBOOK}:{key_prefix}")]


def test_one_run_per_alert_however_often_it_arrives(deployment):
    fp = uuid.uuid4().hex[:16]
    with receiver(alerts_config(deployment)) as url:
        first = httpx.post(url + ENDPOINT, json=payload(fp), headers=BEARER)
        assert first.status_code == 200, first.text
        (made,) = first.json()["runs"]
        assert made["new"] and made["route"] == "down"
        again = httpx.post(url + ENDPOINT, json=payload(fp), headers=BEARER)  # Alertmanager's repeat
        assert again.json()["runs"][0] == {**made, "new": False}

        async def storm() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*(client.post(url + ENDPOINT, json=payload(f"{fp}{i % 3}"),
                                                          headers=BEARER) for i in range(60)))

        answers = asyncio.run(storm())
        assert {a.status_code for a in answers} == {200}
        metrics = httpx.get(url + "/metrics").text
    keys = [r["idempotency_key"] for r in runs_with_key(deployment, fp)]
    assert len(keys) == 4 and len(set(keys)) == 4  # fp and its three storm fingerprints: one run each
    (run,) = [r for r in runs_with_key(deployment, f"{fp}:")]
    assert run["id"] == made["flow_run_id"] and made["deployment"] == RUNBOOK
    params = run["parameters"]
    assert params["runbook"] == RUNBOOK and params["runbook_parameters"] == {"service": "api", "why": "api is down"}
    assert params["alert"]["fingerprint"] == fp and params["alert"]["labels"]["alertname"] == "ServiceDown"
    assert params["severity"] == "MEDIUM" and params["route"] == "down"
    assert "alert" in run["tags"] and "route:down" in run["tags"]
    assert "runbooks_alerts_deduplicated_total 58.0" in metrics  # 1 repeat + 57 of the storm


def test_a_resolved_alert_updates_its_incident_once_and_unmatched_alerts_start_nothing(deployment):
    from prefect.settings import PREFECT_API_URL

    fp = uuid.uuid4().hex[:16]
    with receiver(alerts_config(deployment)) as url:
        never_fired = httpx.post(url + ENDPOINT, json=payload(fp + "x", status="resolved"), headers=BEARER)
        fired = httpx.post(url + ENDPOINT, json=payload(fp), headers=BEARER).json()["runs"][0]
        resolved = httpx.post(url + ENDPOINT, json=payload(fp, status="resolved"), headers=BEARER)
        again = httpx.post(url + ENDPOINT, json=payload(fp, status="resolved"), headers=BEARER)
        unmatched = httpx.post(url + ENDPOINT, json=payload(fp, alertname="SomethingElse"), headers=BEARER)
        metrics = httpx.get(url + "/metrics").text
    assert never_fired.status_code == 200 and never_fired.json()["incidents_updated"] == 0
    assert resolved.status_code == 200 and resolved.json() == {"runs": [], "unmatched": 0, "resolved": 1,
                                                               "incidents_updated": 1}
    assert again.json()["incidents_updated"] == 0  # Alertmanager's repeat: told once
    told = httpx.get(f"{PREFECT_API_URL.value()}/flow_runs/{fired['flow_run_id']}/input/incident-alert-resolved")
    assert told.status_code == 200 and told.json()["fingerprint"] == fp
    assert len(runs_with_key(deployment, fp)) == 1  # no runbook started for the resolution
    assert unmatched.status_code == 200 and unmatched.json()["unmatched"] == 1
    assert "runbooks_alerts_unmatched_total 1.0" in metrics
    for outcome, n in (("incident_updated", 1), ("repeat", 1), ("no_incident", 1)):
        assert f'runbooks_alerts_resolutions_total{{outcome="{outcome}"}} {n}.0' in metrics


def test_labels_with_template_text_arrive_as_text(deployment):
    fp = uuid.uuid4().hex[:16]
    hostile = "{{ annotations.summary }}{% raw %}${IFS}"
    with receiver(alerts_config(deployment)) as url:
        answer = httpx.post(url + ENDPOINT, json=payload(fp, job=hostile), headers=BEARER)
    assert answer.status_code == 200, answer.text
    (run,) = runs_with_key(deployment, fp)
    assert run["parameters"]["runbook_parameters"]["service"] == hostile


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic !!"},
                                     {"Authorization": "Basic " + base64.b64encode(b"am:nope").decode()},
                                     {"Authorization": f"Token {TOKEN}"}])
def test_without_the_right_credentials_401_and_no_run(deployment, headers):
    fp = uuid.uuid4().hex[:16]
    with receiver(alerts_config(deployment)) as url:
        answer = httpx.post(url + ENDPOINT, json=payload(fp), headers=headers)
        basic = httpx.post(url + ENDPOINT, json=payload(fp + "b"),
                           headers={"Authorization": "Basic " + base64.b64encode(b"am:pw").decode()})
    assert answer.status_code == 401 and TOKEN not in answer.text
    assert runs_with_key(deployment, f"{fp}:") == []
    assert basic.status_code == 200  # Basic auth with the right pair works


def test_bad_bodies_are_refused_with_the_answer_alertmanager_must_see(deployment):
    fp = uuid.uuid4().hex[:16]
    big = b'{"version": "4", "alerts": [' + b" " * (10 << 20) + b"]}"
    no_fingerprint = payload(fp)
    del no_fingerprint["alerts"][0]["fingerprint"]
    with receiver(alerts_config(deployment)) as url:
        too_big = httpx.post(url + ENDPOINT, content=big, headers={**BEARER, "Content-Type": "application/json"})
        garbage = httpx.post(url + ENDPOINT, content=b"{not json", headers=BEARER)
        v3 = httpx.post(url + ENDPOINT, json={**payload(fp), "version": "3"}, headers=BEARER)
        unnamed = httpx.post(url + ENDPOINT, json=no_fingerprint, headers=BEARER)
        metrics = httpx.get(url + "/metrics").text
    assert too_big.status_code == 413
    assert garbage.status_code == 422 and "json" in garbage.json()["error"].lower()
    assert v3.status_code == 422 and v3.json()["error"].startswith("version")
    assert unnamed.status_code == 422 and "fingerprint" in unnamed.json()["error"]
    assert runs_with_key(deployment, fp) == []
    for reason in ("too_large", "malformed", "version"):
        assert f'runbooks_alerts_rejected_total{{reason="{reason}"}}' in metrics


def test_prefect_unreachable_is_503_so_alertmanager_retries_and_a_missing_incident_deployment_is_500(deployment):
    fp = uuid.uuid4().hex[:16]
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}/api"  # nothing listens there
    with receiver(alerts_config(deployment), api_url=dead) as url:
        down = httpx.post(url + ENDPOINT, json=payload(fp), headers=BEARER)
        assert httpx.get(url + "/healthz").json() == {"status": "ok"}
    assert down.status_code == 503 and "unreachable" in down.json()["error"]
    with receiver(alerts_config(deployment)) as url:
        back = httpx.post(url + ENDPOINT, json=payload(fp), headers=BEARER)  # the retry, Prefect back
        orphan = httpx.post(url + ENDPOINT, json=payload(fp, alertname="Orphan"), headers=BEARER)
    assert back.status_code == 200 and back.json()["runs"][0]["new"]
    assert len(runs_with_key(deployment, fp)) == 1
    # A route to a runbook that does not exist still declares the incident: people must know.
    assert orphan.status_code == 200 and orphan.json()["runs"][0]["deployment"] == "receiver-test/not-there"
    with receiver(alerts_config(deployment, incident_deployment="incident-response/not-there")) as url:
        lost = httpx.post(url + ENDPOINT, json=payload(fp + "y"), headers=BEARER)
    assert lost.status_code == 500 and "no deployment 'incident-response/not-there'" in lost.json()["error"]


def test_runbooks_receiver_serves_until_sigterm_and_needs_its_config(deployment, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    bare = tmp_path / "bare.toml"
    bare.write_text("")
    env = {**os.environ, "RUNBOOKS_CONFIG": str(bare), "PREFECT_API_URL": PREFECT_API_URL.value()}
    cmd = [sys.executable, "-m", "deployments.cli", "receiver", "--port", str(port := free_port())]
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 2 and "no [alerts] section" in refused.stderr
    assert "Traceback" not in refused.stderr

    good = tmp_path / "runbooks.toml"
    good.write_text(alerts_section(TOKEN, "down", RUNBOOK, incident_deployment=deployment))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**env, "RUNBOOKS_CONFIG": str(good)})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "runbooks receiver did not start"
            time.sleep(0.2)
        fp = uuid.uuid4().hex[:16]
        answer = httpx.post(url + ENDPOINT, json=payload(fp), headers=BEARER)
        assert answer.status_code == 200 and answer.json()["runs"][0]["new"], answer.text
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"Alert receiver: http://127.0.0.1:{port}/alerts (1 routes)" in out
    assert "Traceback" not in out and TOKEN not in out and "runbooks receiver stopped" in out
    (run,) = runs_with_key(deployment, fp)
    assert run["parameters"]["runbook_parameters"] == {"service": "api"}


def test_a_storm_of_a_thousand_posts_for_ten_alerts_makes_ten_runs(deployment):
    import json

    from tests.http_load import storm

    base = uuid.uuid4().hex[:12]
    bodies = [json.dumps(payload(f"{base}{i}")).encode() for i in range(10)]
    with receiver(alerts_config(deployment)) as url:
        _, health, statuses, _ = asyncio.run(storm(int(url.rsplit(":", 1)[1]), ENDPOINT, bodies, 1000, TOKEN))
    assert statuses == [200] * 1000
    assert health and all(h != float("inf") for h in health)  # /healthz answered 200 all through
    runs = runs_with_key(deployment, base)
    assert len(runs) == 10 and len({r["idempotency_key"] for r in runs}) == 10


SECRET = "slack-signing-secret"


def _click(incident_id: str, user: str = "U0ALICE", stamp: int | None = None,
           secret: str = SECRET) -> tuple[bytes, dict[str, str]]:
    """A Slack block_actions post for the Acknowledge button, signed as Slack signs it."""
    import hashlib
    import hmac
    import json
    from urllib.parse import urlencode

    click = {"type": "block_actions", "user": {"id": user, "username": "alice"},
             "actions": [{"action_id": "incident_ack", "block_id": "incident", "value": incident_id,
                          "type": "button"}]}
    body = urlencode({"payload": json.dumps(click)}).encode()
    stamp = stamp or int(time.time())
    signature = "v0=" + hmac.new(secret.encode(), f"v0:{stamp}:".encode() + body, hashlib.sha256).hexdigest()
    return body, {"X-Slack-Request-Timestamp": str(stamp), "X-Slack-Signature": signature,
                  "Content-Type": "application/x-www-form-urlencoded"}


def test_a_signed_slack_click_acknowledges_the_incident_once(deployment):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from tasks import incidents
    from tasks.notify import Severity

    fp = uuid.uuid4().hex[:16]
    with receiver(alerts_config(deployment), signing_secret=SECRET) as url:
        run_id = httpx.post(url + ENDPOINT, json=payload(fp), headers=BEARER).json()["runs"][0]["flow_run_id"]
        with get_client(sync_client=True) as client:
            record = incidents.claim(client, run_id, f"click {fp}", Severity.HIGH, "api")
        first = httpx.post(url + SLACK_ENDPOINT, content=_click(record.id)[0], headers=_click(record.id)[1])
        second = httpx.post(url + SLACK_ENDPOINT, content=_click(record.id, "U0BOB")[0],
                            headers=_click(record.id, "U0BOB")[1])
        forged = httpx.post(url + SLACK_ENDPOINT, content=_click(record.id, secret="guess")[0],
                            headers=_click(record.id, secret="guess")[1])
        stale = httpx.post(url + SLACK_ENDPOINT, content=_click(record.id, stamp=int(time.time()) - 600)[0],
                           headers=_click(record.id, stamp=int(time.time()) - 600)[1])
        unknown = httpx.post(url + SLACK_ENDPOINT, content=_click("INC-2031-01-01-99")[0],
                             headers=_click("INC-2031-01-01-99")[1])
        body, headers = _click(record.id)
        garbage = httpx.post(url + SLACK_ENDPOINT, content=b"payload=%7Bnot-json", headers=headers)
    assert first.status_code == 200 and first.json()["text"] == f"{record.id} acknowledged by <@U0ALICE>."
    assert second.status_code == 200 and "acknowledged already" in second.json()["text"]
    assert forged.status_code == 401 and stale.status_code == 401 and garbage.status_code == 401
    assert unknown.status_code == 200 and "no incident" in unknown.json()["text"]
    told = httpx.get(f"{PREFECT_API_URL.value()}/flow_runs/{run_id}/input/incident-ack")
    assert told.json() == {"by": "<@U0ALICE>", "via": "slack"}


def test_slack_clicks_are_refused_without_a_signing_secret_and_malformed_ones_are_422(deployment):
    with receiver(alerts_config(deployment)) as url:
        body, headers = _click("INC-2031-01-01-1")
        off = httpx.post(url + SLACK_ENDPOINT, content=body, headers=headers)
    assert off.status_code == 404
    with receiver(alerts_config(deployment), signing_secret=SECRET) as url:
        import hashlib
        import hmac

        stamp = str(int(time.time()))
        for raw in (b"payload=%7Bnot-json", b"nothing=here"):
            sig = "v0=" + hmac.new(SECRET.encode(), f"v0:{stamp}:".encode() + raw, hashlib.sha256).hexdigest()
            answer = httpx.post(url + SLACK_ENDPOINT, content=raw, headers={
                "X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": sig})
            assert answer.status_code == 422 and answer.json()["error"] == "not an incident button click"


def test_metrics_export_the_runbooks_own_health_from_prefects_record(deployment):
    """Per runbook and target: when it last completed, and whether its newest run failed."""
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Failed, Running

    flow = f"rb-health-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(flow)
        ended = {}
        for target, final in (("orders", Completed), ("users", Failed), ("orders", Failed), ("users", Completed)):
            created = client.request("POST", "/flow_runs/", json={"flow_id": str(flow_id),
                                                                   "parameters": {"database": target}}).json()
            client.set_flow_run_state(created["id"], Running(), force=True)
            client.set_flow_run_state(created["id"], final(), force=True)
            ended[target, final.__name__] = client.read_flow_run(created["id"]).end_time
            time.sleep(0.05)
    with receiver(alerts_config(deployment)) as url:
        text = httpx.get(url + "/metrics").text
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if flow in line and not line.startswith("#")}
    key = 'runbooks_last_success_timestamp_seconds{{flow="{}",target="{}"}}'
    assert lines[key.format(flow, "orders")] == pytest.approx(ended["orders", "Completed"].timestamp())
    assert lines[key.format(flow, "users")] == pytest.approx(ended["users", "Completed"].timestamp())
    assert lines[f'runbooks_last_run_failed{{flow="{flow}",target="orders"}}'] == 1.0  # its newest failed
    assert lines[f'runbooks_last_run_failed{{flow="{flow}",target="users"}}'] == 0.0  # failed, then passed
    assert "runbooks_health_read_ok 1.0" in text
    assert 'flow="health-check"' not in text
    assert lines[f'runbooks_recent_runs{{flow="{flow}",outcome="completed"}}'] == 2.0
    assert lines[f'runbooks_recent_runs{{flow="{flow}",outcome="failed"}}'] == 2.0
    assert lines[f'runbooks_last_success_duration_seconds{{flow="{flow}",target="orders"}}'] >= 0
    assert "runbooks_incidents_open " in text
