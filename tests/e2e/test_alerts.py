"""The alert path run for real: Debian's Prometheus scrapes the demo service with the
repository's rules, Debian's Alertmanager posts with the repository's config (waits made
short), `runbooks receiver` hands the alert to the Prefect server, and `runbooks serve`
runs the service restart. The service hangs, the alert fires, exactly one restart runs,
the service is healthy again and the alert resolves."""

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
from tests.e2e.conftest import BIN, Proc, base_env, spawn, start_server, wait_final, wait_for, write_config, alerts_section

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
    config = write_config(root / "runbooks.toml", e2e_database, root / "backups")
    config.write_text(config.read_text() + f"""
{runbooks_section(e2e_database, api_port, root, ready_deadline_seconds=30, watch_seconds=1)}
""" + alerts_section(TOKEN, "service-down", "service-restart/service-restart-api"))
    procs: list[Proc] = []
    server = start_server(root / "prefect-home")
    try:
        env = base_env(root / "client", config, server.url)
        subprocess.run([sys.executable, "-c", "from tasks.config import load_settings; "
                        "load_settings().controller('api').start()"], env=env, check=True, timeout=60)
        wait_for(lambda: _ready(f"http://127.0.0.1:{api_port}/ready"), 30, "the demo service")
        serve = spawn([str(BIN / "runbooks"), "serve"], env, root / "serve.log", cwd=root)
        receiver = spawn([str(BIN / "runbooks"), "receiver", "--port", str(receiver_port)], env,
                         root / "receiver.log", cwd=root)
        procs += [serve, receiver]
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
            "scrape_configs": [{"job_name": "api", "static_configs": [{"targets": [f"127.0.0.1:{api_port}"]}]}],
        }))
        procs.append(spawn([prometheus, f"--config.file={prom_config}", f"--storage.tsdb.path={root / 'tsdb'}",
                            f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                           env, root / "prometheus.log", cwd=root))
        wait_for(lambda: _ready(f"http://127.0.0.1:{am_port}/-/ready"), 30, "alertmanager")
        wait_for(lambda: _ready(f"http://127.0.0.1:{prom_port}/-/ready"), 30, "prometheus")
        wait_for(lambda: _ready(f"http://127.0.0.1:{receiver_port}/healthz"), 30, "runbooks receiver")
        wait_for(lambda: "Serving " in serve.output(), 90, "runbooks serve")

        def registered() -> bool:
            with server.api() as client:
                return client.get("/deployments/name/service-restart/service-restart-api").status_code == 200

        wait_for(registered, 60, "the service-restart deployment")
        yield {"server": server, "env": env, "root": root, "api": f"http://127.0.0.1:{api_port}",
               "prometheus": f"http://127.0.0.1:{prom_port}", "receiver": f"http://127.0.0.1:{receiver_port}",
               "serve": serve, "receiver_proc": receiver}
    finally:
        for proc in reversed(procs):
            proc.stop()
        subprocess.run([sys.executable, "-c", "from tasks.config import load_settings; "
                        "load_settings().controller('api').stop()"], env=base_env(root / "client", config),
                       timeout=60)
        server.stop()


def _restart_runs(client: httpx.Client) -> list[dict[str, Any]]:
    deployment = client.get("/deployments/name/service-restart/service-restart-api").json()
    return client.post("/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment["id"]]}}}).json()


def _alerts(prometheus: str, state: str) -> list[dict[str, Any]]:
    alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == "ServiceDown" and a["state"] == state]


def test_a_hanging_service_fires_servicedown_and_exactly_one_restart_runs(drill):
    server, api = drill["server"], drill["api"]
    pid_file = drill["root"] / "api.pid"
    pid_before = pid_file.read_text().split()[0]
    assert httpx.post(f"{api}/admin/fault", json={"mode": "hang"}, timeout=5).status_code == 200
    fired = time.monotonic()

    with server.api() as client:
        runs = wait_for(lambda: _restart_runs(client), 60, "the alert to start a service restart")
        assert len(runs) == 1
        run = runs[0]
        assert run["parameters"] == {"service": "api"}
        assert {"alert", "route:service-down", "severity:critical"} <= set(run["tags"])
        assert run["idempotency_key"].startswith("service-restart/service-restart-api:")
        handed_over = time.monotonic() - fired
        final = wait_final(client, run["id"], timeout=120)
        assert final["state_type"] == "COMPLETED", final["state"]
        assert pid_file.read_text().split()[0] != pid_before  # a new process
        assert httpx.get(f"{api}/health", timeout=5).status_code == 200  # answers again
        assert httpx.get(f"{api}/ready", timeout=5).status_code == 200

        # The alert resolves; Alertmanager posts that too, and repeats never started a second run.
        wait_for(lambda: not _alerts(drill["prometheus"], "firing"), 60, "ServiceDown to resolve")
        metrics = lambda: httpx.get(f"{drill['receiver']}/metrics", timeout=5).text  # noqa: E731
        wait_for(lambda: 'runbooks_alerts_received_total{status="resolved"}' in metrics(), 60,
                 "Alertmanager to post the resolution")
        assert len(_restart_runs(client)) == 1
    text = metrics()
    firing = float(text.split('runbooks_alerts_received_total{status="firing"} ')[1].split()[0])
    assert firing >= 2, text  # Alertmanager posted the alert again while it fired: no second run
    assert 'runbooks_runs_created_total{deployment="service-restart/service-restart-api"} 1.0' in text
    for proc in (drill["serve"], drill["receiver_proc"]):
        assert "Traceback" not in proc.output(), proc.output()[-3000:]
    print(f"alert to run created: {handed_over:.1f} s")
