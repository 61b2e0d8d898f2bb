"""One host: `runbooks serve` starts its Prefect server, registers prefect.yaml as it is,
and runs what the schedule, `runbooks run` and the REST API start."""

from __future__ import annotations

import signal
import time

import yaml

from deployments.spec import PREFECT_YAML
from tests.e2e.conftest import (BIN, api_client, NAMES, base_env, deployments_by_name, run, spawn, start_server,
                                wait_final, wait_for)


def test_serve_prints_its_server_and_registers_prefect_yaml_as_is(served):
    out = served["proc"].output()
    assert f"UI at {served['ui']}" in out and f"Serving {len(NAMES)} deployments" in out, out
    spec = {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    with api_client(served["url"]) as client:
        registered = deployments_by_name(client)
    assert set(registered) == set(spec)
    for name, d in registered.items():
        want = spec[name]
        assert [s["schedule"]["cron"] for s in d["schedules"]] == [s["cron"] for s in want.get("schedules", [])]
        pitr_off = "pitr" in want["tags"]  # the e2e config's orders has no [pitr] section
        assert [s["active"] for s in d["schedules"]] == [not pitr_off for _ in want.get("schedules", [])], name
        assert d["paused"] is False, name
        assert d["tags"] == want["tags"]
        if "concurrency_limit" in want:
            assert d["global_concurrency_limit"]["limit"] == want["concurrency_limit"]["limit"]
            assert d["concurrency_options"]["collision_strategy"] == want["concurrency_limit"]["collision_strategy"]
        else:  # the recoveries: a second one is refused by the flow itself
            assert d["global_concurrency_limit"] is None, name
        assert d["parameters"] == want.get("parameters", {}), name
        assert d["description"] and "Args:" in d["description"], name  # the flow's docstring
    form = registered["restore-test-orders"]["parameter_openapi_schema"]["properties"]
    assert form["database"]["enum"] == ["orders"]  # the configured targets, as a dropdown
    retention = registered["backup-retention"]
    assert retention["parameter_openapi_schema"]["properties"]["auto_approve"]["default"] is False
    assert [s["parameters"] for s in retention["schedules"]] == [{"auto_approve": True}]


def test_runbooks_run_watch_follows_a_backup_to_its_figures(served):
    proc = run([str(BIN / "runbooks"), "run", "backup-orders", "--watch"], served["env"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "started run" in out and "Stored size:" in out and "Throughput:" in out, out
    assert out.strip().splitlines()[-1].endswith(": completed"), out
    assert "Traceback" not in out + proc.stderr


def test_runbooks_run_watch_exits_2_on_an_operator_error(served):
    proc = run([str(BIN / "runbooks"), "run", "restore-test-orders", "--watch",
                "-p", "backup_id=orders-20990101T000000Z-dead"], served["env"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "BackupNotFound: no backup 'orders-20990101T000000Z-dead'" in proc.stdout.strip().splitlines()[-1]


def runs_not_from_schedules(client) -> int:  # type: ignore[no-untyped-def]
    """Runs created by anything but the scheduler, which adds runs ahead of each schedule
    at any moment (tagged auto-scheduled); read twice so none slips in between."""
    while True:
        total = client.post("/flow_runs/count", json={}).json()
        scheduled = client.post("/flow_runs/count", json={"flow_runs": {"tags": {"all_": ["auto-scheduled"]}}}).json()
        if client.post("/flow_runs/count", json={}).json() == total:
            return total - scheduled


def test_runbooks_run_refuses_bad_parameters_before_a_run_exists(served):
    with api_client(served["url"]) as client:
        before = runs_not_from_schedules(client)
    for args, expected in [(["-p", "bogus=1"], "unknown parameter 'bogus'"),
                           (["-p", "dry_run=sometimes"], "parameter 'dry_run': \"sometimes\" is not valid"),
                           (["-p", "database=elsewhere"], "parameter 'database': \"elsewhere\" is not valid"),
                           (["-p", "novalue"], "--param 'novalue': expected key=value")]:
        proc = run([str(BIN / "runbooks"), "run", "backup-orders", *args], served["env"])
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and expected in proc.stderr, proc.stderr
        assert proc.stdout == ""
    proc = run([str(BIN / "runbooks"), "run", "no-such-deployment"], served["env"])
    assert proc.returncode == 2 and "unknown deployment 'no-such-deployment' (known: backup-orders" in proc.stderr
    with api_client(served["url"]) as client:
        assert runs_not_from_schedules(client) == before


def test_a_run_created_through_the_rest_api_runs_on_serve(served):
    with api_client(served["url"]) as client:
        deployment = deployments_by_name(client)["backup-retention"]
        response = client.post(f"/deployments/{deployment['id']}/create_flow_run",
                               json={"parameters": {"dry_run": True}})
        assert response.status_code == 201, response.text
        final = wait_final(client, response.json()["id"])
        assert final["state_type"] == "COMPLETED", final["state"]
        assert final["start_time"] is not None


def test_the_every_minute_schedule_fires_on_its_own(served):
    """The health check's real schedule from prefect.yaml (every minute), no override."""
    with api_client(served["url"]) as client:
        deployment = deployments_by_name(client)["health-check"]

        def fired():
            runs = client.post("/flow_runs/filter", json={
                "flow_runs": {"deployment_id": {"any_": [deployment["id"]]}, "state": {"type": {"any_": ["COMPLETED"]}}}
            }).json()
            return [r for r in runs if r["auto_scheduled"]]

        remaining = 90 - (time.monotonic() - served["started"])
        runs = wait_for(fired, max(remaining, 5), "a scheduled health-check run to complete", every=2)
        assert runs[0]["created_by"] is None or runs[0]["created_by"].get("type") != "USER"


def test_serve_restarted_against_a_server_keeps_every_schedule_active(e2e_config, tmp_path):
    """`runbooks serve` with PREFECT_API_URL set uses that server; its stop pauses the
    deployments and its next start brings them back, schedules active."""
    server = start_server(tmp_path / "server-home")  # a server of its own, as a user's
    env = base_env(tmp_path / "client", e2e_config, server.url)
    try:
        _restart_twice(server, env, tmp_path)
    finally:
        server.stop()


def _restart_twice(server, env, tmp_path):
    for attempt in (1, 2):
        proc = spawn([str(BIN / "runbooks"), "serve"], env, tmp_path / f"serve-{attempt}.log", cwd=tmp_path)
        with server.api() as client:
            def served() -> bool:
                ds = deployments_by_name(client)
                return set(ds) == NAMES and all(not d["paused"] for d in ds.values())

            wait_for(served, 90, f"serve (start {attempt}) to register every deployment unpaused")
            wait_for(lambda: f"Serving {len(NAMES)} deployments" in proc.output(), 30, "serve's start message")
            assert f"Prefect server: {server.url} (PREFECT_API_URL)" in proc.output()
            assert proc.stop(signal.SIGTERM) == 0
            out = proc.output()
            assert "was never awaited" not in out and "Traceback" not in out, out
            ds = deployments_by_name(client)
            assert all(d["paused"] for d in ds.values()), "a stopped serve leaves its deployments paused"
    with server.api() as client:
        assert all(s["active"] for d in deployments_by_name(client).values() for s in d["schedules"]
                   if "pitr" not in d["tags"])

