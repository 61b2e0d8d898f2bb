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

from deployments.receiver import ENDPOINT, create_app
from tasks.alerts import AlertsConfig
from tests.conftest import free_port
from tests.e2e.conftest import alerts_section

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def deployment() -> str:
    """A deployment on the session server (nothing serves it: its runs stay scheduled)."""
    from prefect.client.orchestration import get_client

    name = f"alert-target-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("receiver-test")
        client.create_deployment(flow_id=flow_id, name=name, enforce_parameter_schema=False)
    return f"receiver-test/{name}"


def alerts_config(deployment: str, **extra) -> AlertsConfig:
    return AlertsConfig(bearer_token=TOKEN, basic_username="am", basic_password="pw", routes=[
        {"name": "down", "matchers": ['alertname = "ServiceDown"'], "deployment": deployment,
         "parameters": {"service": "{{ labels.job }}", "why": "{{ annotations.summary }}"}},
        {"name": "missing", "matchers": ['alertname = "Orphan"'], "deployment": "receiver-test/not-there"},
    ], **extra)


@contextmanager
def receiver(config: AlertsConfig, api_url: str | None = None) -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL

    port = free_port()
    app = create_app(config, api_url or PREFECT_API_URL.value())
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


def runs_with_key(key_prefix: str) -> list[dict]:
    from prefect.settings import PREFECT_API_URL

    deployment = key_prefix.split(":", 1)[0].split("/", 1)[1]
    runs = httpx.post(f"{PREFECT_API_URL.value()}/flow_runs/filter",
                      json={"deployments": {"name": {"any_": [deployment]}}, "limit": 200}).json()
    return [r for r in runs if (r.get("idempotency_key") or "").startswith(key_prefix)]


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
    keys = [r["idempotency_key"] for r in runs_with_key(f"{deployment}:{fp}")]
    assert len(keys) == 4 and len(set(keys)) == 4  # fp and its three storm fingerprints: one run each
    (run,) = [r for r in runs_with_key(f"{deployment}:{fp}:")]
    assert run["id"] == made["flow_run_id"] and run["parameters"] == {"service": "api", "why": "api is down"}
    assert "alert" in run["tags"] and "route:down" in run["tags"]
    assert "runbooks_alerts_deduplicated_total 58.0" in metrics  # 1 repeat + 57 of the storm


def test_resolved_and_unmatched_alerts_start_nothing(deployment):
    fp = uuid.uuid4().hex[:16]
    with receiver(alerts_config(deployment)) as url:
        resolved = httpx.post(url + ENDPOINT, json=payload(fp, status="resolved"), headers=BEARER)
        unmatched = httpx.post(url + ENDPOINT, json=payload(fp, alertname="SomethingElse"), headers=BEARER)
        metrics = httpx.get(url + "/metrics").text
    assert resolved.status_code == 200 and resolved.json() == {"runs": [], "unmatched": 0, "resolved": 1}
    assert unmatched.status_code == 200 and unmatched.json()["unmatched"] == 1
    assert runs_with_key(f"{deployment}:{fp}") == []
    assert "runbooks_alerts_unmatched_total 1.0" in metrics


def test_labels_with_template_text_arrive_as_text(deployment):
    fp = uuid.uuid4().hex[:16]
    hostile = "{{ annotations.summary }}{% raw %}${IFS}"
    with receiver(alerts_config(deployment)) as url:
        answer = httpx.post(url + ENDPOINT, json=payload(fp, job=hostile), headers=BEARER)
    assert answer.status_code == 200, answer.text
    (run,) = runs_with_key(f"{deployment}:{fp}")
    assert run["parameters"]["service"] == hostile


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
    assert runs_with_key(f"{deployment}:{fp}:") == []
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
    assert runs_with_key(f"{deployment}:{fp}") == []
    for reason in ("too_large", "malformed", "version"):
        assert f'runbooks_alerts_rejected_total{{reason="{reason}"}}' in metrics


def test_prefect_unreachable_is_503_so_alertmanager_retries_and_a_bad_route_is_500(deployment):
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
    assert len(runs_with_key(f"{deployment}:{fp}")) == 1
    assert orphan.status_code == 500 and "no deployment 'receiver-test/not-there'" in orphan.json()["error"]


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
    good.write_text(alerts_section(TOKEN, "down", deployment))
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
    (run,) = runs_with_key(f"{deployment}:{fp}")
    assert run["parameters"] == {"service": "api"}


def test_a_storm_of_a_thousand_posts_for_ten_alerts_makes_ten_runs(deployment):
    base = uuid.uuid4().hex[:12]
    with receiver(alerts_config(deployment)) as url:
        async def storm() -> list[int]:
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                answers = await asyncio.gather(*(client.post(url + ENDPOINT, json=payload(f"{base}{i % 10}"),
                                                             headers=BEARER) for i in range(1000)))
            return [a.status_code for a in answers]

        statuses = asyncio.run(storm())
        health = httpx.get(url + "/healthz")
    assert statuses == [200] * 1000 and health.status_code == 200
    runs = runs_with_key(f"{deployment}:{base}")
    assert len(runs) == 10 and len({r["idempotency_key"] for r in runs}) == 10
