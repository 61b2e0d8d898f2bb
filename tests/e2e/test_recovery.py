"""Database recovery run the way users run it: `runbooks serve` with the demo service as
the application, runs started by `runbooks run` and the REST API, approvals answered
through the API, and the flow-run process killed (SIGKILL) mid-restore and mid-swap."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from demo.service import runbooks_section
from tasks import postgres
from tests.conftest import free_port
from tests.e2e.conftest import (BIN, api_client, base_env, deployments_by_name, flow_run, run, spawn, wait_final, wait_for,
                                wait_for_approval, write_config)

SWAP_PAUSE = 4  # seconds between the two renames in this module's runs, to kill a run there


@pytest.fixture(scope="module")
def stack(pg_admin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A database big enough that pg_restore takes a moment, the demo service on it under
    the process controller, one verified backup, and `runbooks serve`."""
    from demo.sample_data import build

    root = tmp_path_factory.mktemp("recovery")
    name = f"rb_rec_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = psycopg.conninfo.make_conninfo(pg_admin, dbname=name)
    build(dsn, rows=150_000)
    port = free_port()
    config = write_config(root / "runbooks.toml", dsn, root / "backups")
    config.write_text(config.read_text() + runbooks_section(dsn, port, root, ready_deadline_seconds=30))
    serve_port = free_port()
    env = {**base_env(root / "home", config), "RUNBOOKS_TEST_SWAP_PAUSE": str(SWAP_PAUSE)}
    serve = spawn([str(BIN / "runbooks"), "serve", "--port", str(serve_port)], env, root / "serve.log", cwd=root)
    url = f"http://127.0.0.1:{serve_port}/api"
    env["PREFECT_API_URL"] = url
    try:
        wait_for(lambda: "Serving " in serve.output() or serve.popen.poll() is not None, 120, "runbooks serve")
        assert serve.popen.poll() is None, serve.output()
        for args in (["backup", "orders"], ["restore-test", "orders"]):
            done = run([str(BIN / "runbooks"), *args], env, timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
        service = _controller(config)
        service.start()
        yield {"url": url, "env": env, "dsn": dsn, "admin": pg_admin, "name": name, "config": config,
               "root": root, "service": service, "base_url": f"http://127.0.0.1:{port}"}
    finally:
        _controller(config).stop()
        serve.stop()
        with psycopg.connect(pg_admin, autocommit=True) as conn:
            for (db,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                      (f"{name}%",)).fetchall():
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def _controller(config: Path):  # type: ignore[no-untyped-def]
    from tasks.config import load_settings

    return load_settings(config).controller("api")


def counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return postgres.read_state(conn, ["public"]).tables


def others(stack: dict[str, Any], infix: str) -> list[str]:
    with psycopg.connect(stack["admin"]) as conn:
        return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                           (f"{stack['name']}{infix}%",)).fetchall()]


def post(stack: dict[str, Any], path: str, body: dict[str, Any]) -> httpx.Response:
    with api_client(stack["url"]) as api:
        return api.post(path, json=body)


def start_run(stack: dict[str, Any], deployment: str, **params: Any) -> str:
    with api_client(stack["url"]) as api:
        d = deployments_by_name(api)[deployment]
    r = post(stack, f"/deployments/{d['id']}/create_flow_run", {"parameters": params})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def state(stack: dict[str, Any], run_id: str) -> str:
    with api_client(stack["url"]) as api:
        return flow_run(api, run_id).get("state_type") or ""


def record(stack: dict[str, Any], run_id: str) -> dict[str, Any] | None:
    """The run's durable record in the store (tasks.journal), once written."""
    for path in (stack["root"] / "backups" / "_runs" / "orders").glob("*.json"):
        data = json.loads(path.read_text())
        if data.get("flow_run_id") == run_id:
            return data
    return None


def resume(stack: dict[str, Any], run_id: str, run_input: dict[str, Any]) -> dict[str, Any]:
    r = post(stack, f"/flow_runs/{run_id}/resume", {"run_input": run_input})
    assert r.status_code in (200, 201), r.text  # 200 REJECT, 201 ACCEPT
    return r.json()


def test_a_second_recovery_is_refused_and_approvals_are_checked(stack):
    before, pid = counts(stack["dsn"]), stack["service"].status().pid
    first = start_run(stack, "database-recovery-orders", incident="INC-7")
    with api_client(stack["url"]) as api:
        wait_for_approval(api, first, 120, "the recovery to wait for approval")

    second = run([str(BIN / "runbooks"), "run", "data-loss-orders", "--param", "auto_approve=true", "--watch"],
                 stack["env"], timeout=180)
    assert second.returncode == 2, second.stdout + second.stderr  # an operator error
    assert "already running" in second.stdout + second.stderr and first in second.stdout + second.stderr

    assert resume(stack, first, {"approve": "yes please", "approver": 3})["status"] == "REJECT"
    time.sleep(1)
    assert state(stack, first) == "PAUSED"  # invalid input changes nothing
    assert resume(stack, first, {"approve": False, "approver": "ann", "reason": "wrong database"})["status"] == "ACCEPT"
    with api_client(stack["url"]) as api:
        final = wait_final(api, first, timeout=120)
    assert final["state_type"] == "FAILED" and "not approved" in final["state"]["message"]
    assert counts(stack["dsn"]) == before and stack["service"].status().pid == pid
    assert others(stack, "_restore_") == [] and others(stack, "_pre_restore_") == []


def test_killed_during_the_restore_production_is_untouched_and_the_next_run_cleans_up(stack):
    with psycopg.connect(stack["dsn"]) as conn:
        conn.execute("DELETE FROM order_items WHERE id % 10 = 0")
    damaged, pid = counts(stack["dsn"]), stack["service"].status().pid
    killed = start_run(stack, "database-recovery-orders", auto_approve=True)
    rec = wait_for(lambda: (r := record(stack, killed)) and r["step"] == "restoring" and r, 120,
                   "the restore to begin", every=0.05)
    os.kill(rec["pid"], signal.SIGKILL)
    with api_client(stack["url"]) as api:
        assert wait_final(api, killed, timeout=120)["state_type"] in ("CRASHED", "FAILED")
    assert counts(stack["dsn"]) == damaged and stack["service"].status().pid == pid  # never touched
    half = rec["databases"][0]
    assert half in others(stack, "_restore_")

    done = run([str(BIN / "runbooks"), "run", "database-recovery-orders", "--param", "auto_approve=true",
                "--watch"], stack["env"], timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert f"dropped {half}" in out and "production was never touched" in out
    assert "RTO" in out and "Data-loss window" in out
    assert counts(stack["dsn"])["public.order_items"] > damaged["public.order_items"]
    assert others(stack, "_restore_") == [] and len(others(stack, "_pre_restore_")) == 1


def test_killed_between_the_renames_cleanup_puts_production_back(stack):
    with psycopg.connect(stack["dsn"]) as conn:
        conn.execute("TRUNCATE audit_logs")
    damaged = counts(stack["dsn"])
    asides = others(stack, "_pre_restore_")
    killed = start_run(stack, "data-loss-orders", auto_approve=True)
    rec = wait_for(lambda: (r := record(stack, killed)) and r["step"] == "promoting" and r, 180,
                   "the swap to begin", every=0.05)
    time.sleep(1)  # inside the transaction, between the two renames
    os.kill(rec["pid"], signal.SIGKILL)
    assert not stack["service"].status().running  # writes were stopped for the swap

    done = run([str(BIN / "runbooks"), "recovery", "cleanup", "--yes", "--older-than", "30"], stack["env"], timeout=180)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "production was never touched" in out and f"dropped {rec['restored']}" in out
    assert "started service api again" in out
    assert counts(stack["dsn"]) == damaged  # the original production, as the run found it
    assert stack["service"].status().running
    assert others(stack, "_pre_restore_") == asides and others(stack, "_restore_") == []
