"""Slots that cannot get stuck, tried as a user would: `kill -9` of a restore test in the
middle of pg_restore (with the CLI's temporary server, and with a persistent server),
and a Prefect server restarted while a slot is held."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.e2e.conftest import BIN, base_env, run, spawn, start_server, wait_for, write_config

KILL_TO_FREE_SECONDS = 60  # the promise: a dead holder's slot is free within a minute


@pytest.fixture(scope="module")
def big_database(pg_admin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """(admin dsn, database name, runbooks.toml): large enough that pg_restore takes a
    moment, with one backup in its store."""
    from demo.sample_data import build

    name = f"rb_slots_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = psycopg.conninfo.make_conninfo(pg_admin, dbname=name)
    build(dsn, rows=400_000)
    root = tmp_path_factory.mktemp("slots")
    config = write_config(root / "runbooks.toml", dsn, root / "backups")
    done = run([str(BIN / "runbooks"), "backup", "orders"], base_env(root / "home", config))
    assert done.returncode == 0, done.stdout + done.stderr
    yield pg_admin, name, config
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        for (db,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                  (f"{name}%",)).fetchall():
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def _scratch(pg_admin: str, name: str) -> list[str]:
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                           (f"{name}_restoretest_%",)).fetchall()]


def _kill_mid_restore(env: dict[str, str], pg_admin: str, name: str, log: Path) -> float:
    """Start `runbooks restore-test`, SIGKILL its whole process group (its temporary
    server too, if it has one) once pg_restore is writing the scratch database."""
    before = set(_scratch(pg_admin, name))
    proc = spawn([str(BIN / "runbooks"), "restore-test", "orders"], env, log)
    wait_for(lambda: set(_scratch(pg_admin, name)) - before or proc.popen.poll() is not None, 120,
             "pg_restore to start", every=0.05)
    assert proc.popen.poll() is None, f"the restore test ended before it could be killed: {proc.output()[-2000:]}"
    proc.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    assert set(_scratch(pg_admin, name)) - before, "the restore test finished before the kill"
    return killed_at


def _next_run_gets_the_slot(env: dict[str, str], killed_at: float) -> str:
    proc = run([str(BIN / "runbooks"), "backup", "orders"], env, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "freed the slot of run" in out and "database:orders" in out, out[-3000:]
    assert "Traceback" not in out
    return out


def test_kill_9_with_the_cli_temporary_server(big_database, tmp_path):
    pg_admin, name, config = big_database
    env = base_env(tmp_path / "home", config)  # no PREFECT_API_URL: a temporary server per command
    killed_at = _kill_mid_restore(env, pg_admin, name, tmp_path / "killed.log")
    t0 = time.monotonic()
    out = _next_run_gets_the_slot(env, killed_at)
    freed_after = time.monotonic() - killed_at
    # The next command also starts its own temporary server (~10 s) and runs the backup.
    assert freed_after < KILL_TO_FREE_SECONDS + 30, (freed_after, time.monotonic() - t0, out[-2000:])


def test_kill_9_with_a_persistent_server(big_database, tmp_path):
    """Also: the spool is a file without a name, so a SIGKILL leaves no decrypted dump on
    disk; the scratch database the killed run created is in its record, and the next
    restore test drops it and says so."""
    pg_admin, name, config = big_database
    spool = tmp_path / "spool"
    own = tmp_path / "runbooks.toml"
    own.write_text(f'work_dir = "{spool}"\n' + config.read_text())
    server = start_server(tmp_path / "server-home")
    try:
        env = base_env(tmp_path / "home", own, server.url)
        before = set(_scratch(pg_admin, name))
        killed_at = _kill_mid_restore(env, pg_admin, name, tmp_path / "killed.log")
        left = set(_scratch(pg_admin, name)) - before
        assert left and list(spool.iterdir()) == []  # no file, not even while it ran
        assert oct(spool.stat().st_mode & 0o777) == "0o700"
        proc = run([str(BIN / "runbooks"), "restore-test", "orders"], env, timeout=300)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
        assert time.monotonic() - killed_at < KILL_TO_FREE_SECONDS + 15, out[-2000:]
        assert "freed the slot of run" in out and "database:orders" in out, out[-3000:]
        assert "Traceback" not in out
        for scratch in left:
            assert f"dropped {scratch}, left by restore-test run" in out, out[-3000:]
        assert _scratch(pg_admin, name) == []  # earlier killed runs' too: their records are in the store
        with server.api() as client:
            limit = client.get("/v2/concurrency_limits/database:orders").json()
        assert limit["active_slots"] == 0
    finally:
        server.stop()


HOLDER = """
import sys, time
from deployments.environment import quiet_prefect
quiet_prefect()
from prefect import flow
from tasks.concurrency import exclusive

@flow(name="slot-holder")
def hold(seconds: float) -> None:
    with exclusive("database", "orders"):
        print("holding", flush=True)
        time.sleep(seconds)
    print("released", flush=True)

hold(float(sys.argv[1]))
"""


def test_a_server_restart_while_a_slot_is_held_leaks_nothing(big_database, tmp_path):
    _, _, config = big_database
    server = start_server(tmp_path / "server-home")
    try:
        env = base_env(tmp_path / "home", config, server.url)
        script = tmp_path / "holder.py"
        script.write_text(HOLDER)
        holder = spawn([str(BIN / "python"), str(script), "25"], env, tmp_path / "holder.log")
        wait_for(lambda: "holding" in holder.output() or holder.popen.poll() is not None, 60, "the holder")
        server.stop()
        server.start()  # same port, home and database
        with server.api() as client:
            assert client.get("/v2/concurrency_limits/database:orders").json()["active_slots"] == 1
        assert holder.popen.wait(timeout=90) == 0, holder.output()
        assert "released" in holder.output()
        with server.api() as client:
            assert client.get("/v2/concurrency_limits/database:orders").json()["active_slots"] == 0
        proc = run([str(BIN / "runbooks"), "backup", "orders"], env)  # takes the slot at once
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "waiting for" not in out and "freed the slot" not in out, out
    finally:
        server.stop()

