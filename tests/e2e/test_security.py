"""The security runbooks run the way users run them: Debian's Prometheus scrapes the demo
service (its own Redis namespace, its limits file) with the repository's rules, Debian's
Alertmanager posts to the receiver in `runbooks serve`, the Prefect server runs the
incidents and their runbooks. A key reading personal data is revoked from its alert, a
flood gets limits proposed and applied once approved, a revocation is approved in the
UI, and a limit is raised and reverted with `runbooks run`."""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tasks.api_keys import claim
from tests.conftest import free_port
from tests.e2e.conftest import (BIN, SHOTS, AlertPorts, alert_sections, alert_stack, api_client, choose,
                                custom_run_form, run, submit_form, wait_final, wait_for, wait_for_approval, write_config, submit_dialog)
from tests.security_stack import LIMITS, call, new_key, security_section, usual_use
from tests.shared_redis import REDIS_URL
from tests.slack_standin import running_standin

TOKEN = "e2e-security-token"
ROUTES = f"""
[alerts]
bearer_token = "{TOKEN}"

[[alerts.routes]]
name = "api-key-compromise"
matchers = ['alertname = "ApiKeyNewPiiAccess"']
deployment = "api-key-revocation/api-key-revocation"
parameters = {{ key = "{{{{ labels.key_prefix }}}}", reason = "{{{{ annotations.summary }}}}" }}

[[alerts.routes]]
name = "ddos"
matchers = ['alertname = "RateLimitedGlobally"']
deployment = "ddos-response/ddos-response"
"""


@pytest.fixture(scope="module")
def sec(e2e_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from demo.service import runbooks_section

    root = tmp_path_factory.mktemp("security")
    api_port, ports, ns = free_port(), AlertPorts(), f"rbe2e:{uuid.uuid4().hex[:8]}:"
    limits = root / "limits.toml"
    limits.write_text(LIMITS)
    argv = [sys.executable, "-m", "demo.service", "--dsn", e2e_database, "--port", str(api_port),
            "--redis", REDIS_URL, "--key-prefix", ns, "--limits", str(limits)]
    cache = redis.Redis.from_url(REDIS_URL)
    with running_standin() as slack:
        config = write_config(root / "runbooks.toml", e2e_database, root / "backups")
        config.write_text(config.read_text() + runbooks_section(e2e_database, api_port, root, command=argv,
                                                                grace_seconds=1)
                          + security_section(root, ns) + f'[security.rate_limits]\nconfig_file = "{limits}"\n'
                          + alert_sections(slack.url, ports) + ROUTES)
        with alert_stack(root, config, api_port, TOKEN, ports,
                         ["incident-response/incident-response", "api-key-revocation/api-key-revocation",
                          "ddos-response/ddos-response", "rate-limit-adjustment/rate-limit-adjustment"]) as stack:
            yield {**stack, "slack": slack, "dsn": e2e_database, "ns": ns, "cache": cache,
                   "delivery": root / "keys"}
    for key in cache.scan_iter(f"{ns}*"):
        cache.delete(key)


def _runs(client: httpx.Client, flow: str) -> list[dict[str, Any]]:
    return client.post("/flow_runs/filter", json={"flows": {"name": {"any_": [flow]}},
                                                  "sort": "EXPECTED_START_TIME_DESC"}).json()


def _firing(prometheus: str, name: str) -> list[dict[str, Any]]:
    alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == name and a["state"] == "firing"]


def _resolve(sec: dict[str, Any], incident_id: str, incident_run_id: str) -> dict[str, Any]:
    """Resolve the incident from a terminal (its alert would take minutes to clear)."""
    done = run([str(BIN / "runbooks"), "incident", "resolve", incident_id, "--by", "e2e", "--note", "handled"],
               sec["env"])
    assert done.returncode == 0, done.stdout + done.stderr
    with api_client(sec["server"].url) as client:
        return wait_final(client, incident_run_id, timeout=120)


class Traffic:
    """Requests in a thread until stopped; remembers when a 401 first came back."""

    def __init__(self, url: str, key: str, path: str, ips: list[str], every: float) -> None:
        self.first_401: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(url, key, path, ips, every), daemon=True)
        self.thread.start()

    def _run(self, url: str, key: str, path: str, ips: list[str], every: float) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                if call(url, key, path, ip=ips[i % len(ips)]) == 401 and self.first_401 is None:
                    self.first_401 = time.time()
            except httpx.HTTPError:
                pass
            i += 1
            time.sleep(every)

    def end(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def test_a_key_reading_personal_data_is_revoked_from_its_alert_in_seconds(sec):
    url, server = sec["api"], sec["server"]
    key_id, plaintext = new_key(sec["dsn"])
    usual_use(sec["dsn"], key_id)  # its owner's history: orders, from one address
    attacker = Traffic(url, plaintext, "/api/profile", ["203.0.113.66"], every=0.1)
    try:
        fired = wait_for(lambda: _firing(sec["prometheus"], "ApiKeyNewPiiAccess"), 90, "ApiKeyNewPiiAccess")[0]
        assert fired["labels"]["key_prefix"] == plaintext[:16]
        with api_client(server.url) as client:
            revocation = wait_for(lambda: [r for r in _runs(client, "api-key-revocation")
                                           if r["parameters"].get("key") == plaintext[:16]], 60, "the revocation")[0]
            final = wait_final(client, revocation["id"], timeout=120)
            wait_for(lambda: attacker.first_401, 30, "the attacker to get 401")
    finally:
        attacker.end()
    assert final["state_type"] == "COMPLETED", final["state"]
    assert revocation["parent_task_run_id"]  # a subflow of the incident
    params = revocation["parameters"]
    assert params["incident"].startswith("INC-") and params["alerted_at"]
    assert "reads personal data it never read before" in params["reason"]
    active_at = datetime.fromisoformat(fired["activeAt"].replace("Z", "+00:00")).timestamp()
    alert_to_401 = attacker.first_401 - active_at
    assert alert_to_401 < 60, alert_to_401
    print(f"alert pending -> the attacker's first 401: {alert_to_401:.1f} s")

    with api_client(server.url) as client:
        report = next(a["data"] for a in client.post("/artifacts/filter", json={
            "artifacts": {"key": {"like_": f"api-key-revocation-key-{key_id}-%"}}}).json())
        (incident,) = [r for r in _runs(client, "incident-response")
                       if r["parameters"].get("runbook") == "api-key-revocation/api-key-revocation"]
    assert "automatic, policy met: new_pii_fields and rate_spike" in report
    assert "| Time to 401 from the alert |" in report
    assert _resolve(sec, params["incident"], incident["id"])["state_type"] == "COMPLETED"

    (delivery,) = sec["delivery"].glob("api-key-*-user-7.txt")
    replacement = claim(delivery, sec["delivery"])
    assert call(url, replacement) == 200 and call(url, plaintext) == 401
    with api_client(server.url) as client:
        artifacts = json.dumps(client.post("/artifacts/filter", json={}).json())
        logs = json.dumps(client.post("/logs/filter", json={"limit": 200}).json())
    database = b"".join(p.read_bytes() for p in Path(server.home).glob("*.db*"))
    assert database, "the Prefect server's database was not found"
    for secret in (replacement, plaintext):
        assert secret not in artifacts and secret not in logs and secret not in sec["serve"].output()
        assert secret not in json.dumps(sec["slack"].requests) and secret.encode() not in database


def test_a_flood_gets_limits_proposed_and_applied_only_once_approved(sec):
    url, server, ns, cache = sec["api"], sec["server"], sec["ns"], sec["cache"]
    customers = [new_key(sec["dsn"], user_id=11, tier="standard") for _ in range(2)]
    for key_id, _ in customers:
        usual_use(sec["dsn"], key_id)
    flood_id, flood_key = new_key(sec["dsn"], user_id=12, tier="standard")
    flood = Traffic(url, flood_key, "/api/orders", [f"198.18.0.{i}" for i in range(40)], every=0.02)
    helpers = [Traffic(url, k, "/api/orders", ["198.51.100.7"], every=1.0) for _, k in customers]
    try:
        wait_for(lambda: _firing(sec["prometheus"], "RateLimitedGlobally"), 120, "RateLimitedGlobally")
        with api_client(server.url) as client:
            ddos = wait_for(lambda: _runs(client, "ddos-response"), 60, "the ddos-response run")[0]
            wait_for_approval(client, ddos['id'], 90, "the proposal to wait for approval")
            proposal = client.post("/artifacts/filter", json={"artifacts": {"key": {"any_": ["ddos-proposal"]}},
                                                              "sort": "CREATED_DESC"}).json()[0]["data"]
            assert f"| key {flood_id} | {flood_key[:16]} | 5 | 1 |" in proposal, proposal
            assert cache.get(f"{ns}rate_limit:key:{flood_id}:requests_per_minute") is None  # not yet
            resumed = client.post(f"/flow_runs/{ddos['id']}/resume", json={"run_input": {
                "approve": True, "approver": "oncall-e2e", "reason": "flood from 198.18/15"}})
            assert resumed.status_code == 201 and resumed.json()["status"] == "ACCEPT", resumed.text
            final = wait_final(client, ddos["id"], timeout=60)
            (incident,) = [r for r in _runs(client, "incident-response")
                           if r["parameters"].get("runbook") == "ddos-response/ddos-response"]
            incident_id = client.get(f"/flow_runs/{ddos['id']}").json()["parameters"]["incident"]
    finally:
        for t in (flood, *helpers):
            t.end()
    assert final["state_type"] == "COMPLETED", final["state"]
    assert int(cache.get(f"{ns}rate_limit:key:{flood_id}:requests_per_minute")) == 1
    record = cache.hgetall(f"{ns}rate_limit_override:key:{flood_id}")
    assert record[b"by"] == b"ddos-response" and incident_id.encode() in record[b"reason"]
    assert _resolve(sec, incident_id, incident["id"])["state_type"] == "COMPLETED"


def test_a_revocation_started_in_the_ui_waits_for_its_approval_there(sec, page):
    url, server = sec["api"], sec["server"]
    key_id, plaintext = new_key(sec["dsn"], user_id=21)
    assert call(url, plaintext) == 200
    served = {"ui": sec["ui"]}
    custom_run_form(page, served, "api-key-revocation")
    page.get_by_text("The key's id, or the start of its prefix").wait_for()
    page.locator("textarea").first.fill(str(key_id))
    page.screenshot(path=str(SHOTS / "8-api-key-revocation-form.png"), full_page=True)
    submit_form(page)
    with api_client(server.url) as client:
        (started,) = [r for r in _runs(client, "api-key-revocation") if r["parameters"].get("key") == str(key_id)]
        wait_for_approval(client, started['id'], 90, "the revocation to wait for approval")
    assert call(url, plaintext) == 200  # nothing changed while it waits
    page.goto(f"{sec['ui']}/runs/flow-run/{started['id']}")
    page.get_by_role("button", name="Resume").click()
    form = page.get_by_role("dialog")
    form.get_by_text("Approve: revoke key").wait_for()
    form.get_by_text("Requests: 1 in the last 24 h").wait_for()  # the evidence, in the form
    page.screenshot(path=str(SHOTS / "9-api-key-approval.png"), full_page=True)
    form.get_by_role("switch").first.click()
    form.locator("textarea").nth(0).fill("ann")
    form.locator("textarea").nth(1).fill("customer reported the key in a public gist")
    submit_dialog(form)
    with api_client(server.url) as client:
        final = wait_final(client, started["id"], timeout=120)
    assert final["state_type"] == "COMPLETED", final["state"]
    assert call(url, plaintext) == 401
    page.goto(f"{sec['ui']}/runs/flow-run/{started['id']}")
    page.get_by_text("Artifacts", exact=True).click()
    page.get_by_text(f"API key revocation of key {key_id} (").click()
    page.get_by_text("approved by ann: customer reported the key in a public gist").first.wait_for()
    page.screenshot(path=str(SHOTS / "10-api-key-report.png"), full_page=True)


def test_a_limit_raised_and_reverted_with_runbooks_run(sec):
    ns, cache = sec["ns"], sec["cache"]
    name = f"{ns}rate_limit:tier:standard:requests_per_minute"
    before = cache.get(name)  # an earlier test's override, or nothing
    raised = run([str(BIN / "runbooks"), "run", "rate-limit-adjustment", "-p", "scope=tier", "-p", "target=standard",
                  "-p", "limit=8", "-p", "watch_seconds=2", "-p", "reason=launch", "-p", "requested_by=carol",
                  "--watch"], sec["env"])
    assert raised.returncode == 0, raised.stdout + raised.stderr
    assert int(cache.get(name)) == 8 and cache.ttl(name) > 3500
    reverted = run([str(BIN / "runbooks"), "run", "rate-limit-revert", "-p", "scope=tier", "-p", "target=standard",
                    "--watch"], sec["env"])
    assert reverted.returncode == 0, reverted.stdout + reverted.stderr
    assert cache.get(name) == before  # what the override replaced, exactly
    bad = run([str(BIN / "runbooks"), "run", "rate-limit-adjustment", "-p", "scope=region", "-p", "limit=8"],
              sec["env"])
    assert bad.returncode == 2 and "scope" in bad.stderr and "Traceback" not in bad.stderr


def test_a_limit_raised_from_its_form_in_the_ui(sec, page):
    """runbook 4 as a person starts it in the browser: the scope from its dropdown, the
    tier, the new limit and the reason typed in; the run sets the override."""
    ns, cache, server = sec["ns"], sec["cache"], sec["server"]
    served = {"ui": sec["ui"]}
    custom_run_form(page, served, "rate-limit-adjustment")
    try:
        page.get_by_text("global, tier or key.").wait_for()
        choose(page, 0, "tier")  # scope
        numbers = page.locator("input[type=number]")
        numbers.nth(0).fill("9")  # limit
        numbers.nth(2).fill("2")  # watch_seconds
        page.locator("textarea").nth(0).fill("standard")  # target
        page.locator("textarea").nth(1).fill("launch day, from the UI")  # reason
        page.screenshot(path=str(SHOTS / "11-rate-limit-form.png"), full_page=True)
        submit_form(page)
    except Exception:
        page.screenshot(path=str(SHOTS / "failed-rate-limit-form.png"), full_page=True)
        raise
    with api_client(server.url) as client:
        (started,) = wait_for(lambda: [r for r in _runs(client, "rate-limit-adjustment")
                                       if r["parameters"].get("reason") == "launch day, from the UI"], 60, "the run")
        final = wait_final(client, started["id"], timeout=120)
    assert final["state_type"] == "COMPLETED", final["state"]
    assert started["parameters"]["scope"] == "tier" and started["parameters"]["limit"] == 9
    assert int(cache.get(f"{ns}rate_limit:tier:standard:requests_per_minute")) == 9
