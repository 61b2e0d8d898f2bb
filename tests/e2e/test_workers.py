"""Several hosts: a Prefect server on PostgreSQL, `prefect deploy --all`, two process
workers sharing the runs, a worker set up wrong, and every `prefect` command of the docs
against that server. The tests run in file order (they build on each other's state)."""

from __future__ import annotations

import re
import shlex
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from deployments.spec import PROJECT
from tests.e2e.conftest import (BIN, NAMES, Server, base_env, deployments_by_name, run, spawn, start_server,
                                wait_final, wait_for)



@pytest.fixture(scope="module")
def pg_server(pg_admin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The Prefect server backed by its own PostgreSQL database, as a multi-host set-up runs it."""
    info = psycopg.conninfo.conninfo_to_dict(pg_admin)
    if "host" not in info or str(info.get("host", "")).startswith("/"):
        from tests.conftest import need

        need(False, "the Prefect server on PostgreSQL needs PostgreSQL over TCP")
    name = f"rb_prefect_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = (f"postgresql+asyncpg://{info.get('user', 'postgres')}@{info['host']}:"
           f"{info.get('port', 5432)}/{name}")
    server = start_server(tmp_path_factory.mktemp("pg-prefect") / "home", db_url=url)
    yield server
    server.stop()
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def state() -> dict[str, Any]:
    return {}


def test_deploy_all_registers_every_deployment(pg_server, e2e_config, tmp_path, state):
    env = base_env(tmp_path / "client", e2e_config, pg_server.url)
    state["env"] = env
    pool = run([str(BIN / "prefect"), "work-pool", "create", "runbooks", "--type", "process", "--overwrite"], env)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deploy = run([str(BIN / "prefect"), "deploy", "--all", "--no-prompt"], env)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    with pg_server.api() as client:
        registered = deployments_by_name(client)
    assert set(registered) == NAMES
    assert all(d["work_pool_name"] == "runbooks" for d in registered.values())
    assert registered["backup-orders"]["pull_steps"] == [
        {"deployments.steps.set_project_directory": {}}]


def _worker(pg_server: Server, env: dict[str, str], name: str, log: Path):
    return spawn([str(BIN / "prefect"), "worker", "start", "--pool", "runbooks", "--name", name,
                  "--limit", "1"], {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"}, log, cwd=log.parent)


def test_two_workers_share_runs_from_the_rest_api_and_runbooks_run(pg_server, tmp_path, state):
    env = state["env"]
    workers = [_worker(pg_server, env, f"host-{i}", tmp_path / f"worker-{i}.log") for i in (1, 2)]
    try:
        wait_for(lambda: all("started" in w.output() for w in workers), 60, "two workers to start")
        with pg_server.api() as client:
            ids = {d["name"]: d["id"] for d in deployments_by_name(client).values()}
            run_ids = []
            # Not health-check: its every-minute schedule (CANCEL_NEW) may hold its one slot just then.
            for params in ({"dry_run": True}, {"dry_run": False}, {"dry_run": True}):
                r = client.post(f"/deployments/{ids['backup-retention']}/create_flow_run", json={"parameters": params})
                assert r.status_code == 201, r.text
                run_ids.append(r.json()["id"])
            for _ in range(1):
                cli = run([str(BIN / "runbooks"), "run", "backup-orders"], env)
                assert cli.returncode == 0, cli.stdout + cli.stderr
                run_ids.append(re.search(r"\(([0-9a-f-]{36})\)", cli.stdout).group(1))
            finals = [wait_final(client, rid, timeout=180) for rid in run_ids]
        logs = [w.output() for w in workers]
        assert [f["state_type"] for f in finals] == ["COMPLETED"] * len(run_ids), \
            [(f["name"], f["state"]["message"]) for f in finals] + [lg[-2000:] for lg in logs]
        taken = [{rid for rid in run_ids if rid in lg} for lg in logs]
        assert taken[0] and taken[1], f"one worker ran everything: {taken}"
        assert taken[0] | taken[1] == set(run_ids)
        assert all("Traceback" not in lg for lg in logs), logs
    finally:
        for w in workers:
            w.stop()


def test_a_worker_without_runbooks_home_fails_the_run_with_one_line(pg_server, tmp_path, state):
    env = {k: v for k, v in state["env"].items() if k != "RUNBOOKS_HOME"}
    worker = _worker(pg_server, env, "misconfigured", tmp_path / "worker.log")
    try:
        wait_for(lambda: "started" in worker.output(), 60, "the worker to start")
        with pg_server.api() as client:
            deployment = deployments_by_name(client)["backup-orders"]
            rid = client.post(f"/deployments/{deployment['id']}/create_flow_run", json={}).json()["id"]
            final = wait_final(client, rid)
            assert final["state_type"] == "FAILED", final["state"]
            assert final["state"]["message"].startswith("RUNBOOKS_HOME is not set where this worker runs")
            # The worker ships its log lines in batches, so the line may land after the state.
            wait_for(lambda: any(lg["message"] == final["state"]["message"] for lg in client.post(
                "/logs/filter", json={"logs": {"flow_run_id": {"any_": [rid]}}}).json()), 30, "the run's log line")
        out = worker.output()
        assert "Traceback" not in out and "FileNotFoundError" not in out, out
    finally:
        worker.stop()


# Commands of the docs that start a long-running process: the fixtures start them
# (server: Server.start; worker: _worker), with a test port, name and query interval.
LONG_RUNNING = ("prefect server start", "prefect worker start --pool runbooks")


def doc_commands() -> list[tuple[str, str]]:
    """Every `prefect ...` command in README.md and docs/: lines of fenced blocks (after
    any VAR=value prefix, before a # comment) and inline `prefect ...` spans."""
    found: list[tuple[str, str]] = []
    for path in [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]:
        fenced = False
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                fenced = not fenced
                continue
            if fenced:
                words = line.split("#")[0].split()
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                    words.pop(0)
                candidates = [" ".join(words)] if words[:1] == ["prefect"] else []
            else:
                candidates = re.findall(r"`(prefect [^`]+)`", line)
            found += [(path.name, c) for c in candidates if (path.name, c) not in found]
    return found


def test_every_prefect_command_in_the_docs_runs(pg_server, state):
    """Run against the server the other tests used, with a restore test's artifact and a
    restart's slot in it, as a user's server would have them."""
    env = state["env"]
    commands = doc_commands()
    assert len(commands) >= 10, commands
    long_running = [c for _, c in commands if c.startswith(LONG_RUNNING)]
    assert long_running, "the docs no longer say how to start the server and the workers"
    for args in (["backup", "orders"], ["restore-test", "orders"]):
        done = run([str(BIN / "runbooks"), *args], env)
        assert done.returncode == 0, done.stdout + done.stderr
    with pg_server.api() as client:
        latest = client.post("/flow_runs/filter", json={
            "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}, "sort": "END_TIME_DESC", "limit": 1,
        }).json()[0]["id"]
        client.post("/v2/concurrency_limits/", json={"name": "service:api", "limit": 1})
    failures, tried = [], set()
    for source, command in commands:
        if command.startswith(LONG_RUNNING) or command in tried:
            continue  # a command several pages give is run once
        tried.add(command)
        args = shlex.split(command.replace("<flow-run-id>", latest))
        proc = run([str(BIN / args[0]), *args[1:]], env, timeout=120)
        if proc.returncode != 0 or "Traceback" in proc.stdout + proc.stderr:
            failures.append(f"{source}: {command}: exit {proc.returncode}: {(proc.stdout + proc.stderr)[-600:]}")
    assert not failures, "\n".join(failures)
