#!/usr/bin/env python
"""Benchmark: the database-recovery flow against the raw steps it is made of and the
reference's manual procedure, on the same database in the same run.

For each size (the demo's 100,000 rows, and about 1 GB):

  flow    `database_recovery(auto_approve=True)` with the demo service as the
          application (process controller): RTO (flow start to service ready) and
          outage (writes stopped to ready), and where the time went;
  raw     `pg_restore -j2 --exit-on-error` of the same archive into a new database, then
          the two renames in one transaction (what the flow cannot do without);
  manual  the reference's runbook: stop the service, `gunzip -c dump.sql.gz | psql` into
          a new database, rename, start the service and wait for /ready; the service is
          down the whole time, so its outage is all of it.

It prints the three RTOs, the ratios, the outages, the flow's own overhead (its RTO minus
pg_restore and the count and content checks) and the cost of the content checksums at
backup time.

    python benchmarks/recovery.py                 # demo size and ~1 GB (several minutes)
    python benchmarks/recovery.py --sizes 100000  # rows; one size only
    python benchmarks/recovery.py --pg-dsn postgresql://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from deployments.environment import quiet_prefect  # noqa: E402

quiet_prefect()

import psycopg  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402

def say(text: str = "") -> None:
    print(text, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(cmd: str, env: dict[str, str]) -> float:
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:60]}... failed: {proc.stderr.strip()[:300]}")
    return time.monotonic() - t0


def new_database(admin: str, name: str) -> str:
    """Create an empty database; its conninfo."""
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_conninfo(admin, dbname=name)


def rename_pair(admin: str, a: str, a_to: str, b: str, b_to: str) -> float:
    t0 = time.monotonic()
    with psycopg.connect(admin, autocommit=True) as conn, conn.transaction():
        conn.execute(f'ALTER DATABASE "{a}" RENAME TO "{a_to}"')
        conn.execute(f'ALTER DATABASE "{b}" RENAME TO "{b_to}"')
    return time.monotonic() - t0


def bench_size(admin: str, rows: int, work: Path) -> dict[str, Any]:
    from demo.sample_data import build
    from demo.service import runbooks_section
    from flows.backup_database import backup_database
    from flows.database_recovery import database_recovery
    from flows.restore_test import restore_test
    from tasks import backups, postgres
    from tasks.config import load_settings
    from tasks.probes import wait_until_ready

    name = f"rb_bench_{uuid.uuid4().hex[:6]}"
    dsn = new_database(admin, name)
    out: dict[str, Any] = {"rows": rows}
    service = None
    try:
        say(f"  building {rows:,} rows ...")
        build(dsn, rows=rows)
        with psycopg.connect(dsn) as conn:
            out["db_bytes"] = int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])
        port = free_port()
        config = work / f"{name}.toml"

        def write(sample: float) -> None:
            config.write_text(f"""
[databases.orders]
dsn = "{dsn}"
content_sample_percent = {sample}
[stores.local]
kind = "local"
path = "{work / name}"
""" + runbooks_section(dsn, port, work, ready_deadline_seconds=60))
            os.environ["RUNBOOKS_CONFIG"] = str(config)

        write(0)
        say("  backup without content checksums ...")
        plain = backup_database("orders")
        write(1.0)
        say("  backup with content checksums (1 %) ...")
        checked = backup_database("orders")
        out["backup_seconds_counts_only"] = plain.seconds
        out["backup_seconds_with_content"] = checked.seconds
        assert restore_test("orders", backup_id=checked.backup_id).passed

        settings = load_settings()
        db = settings.database("orders")
        store = settings.open_store("local")
        manifest = backups.load_manifest(store, checked.backup_id)
        archive = work / f"{name}.dump"
        with open(archive, "wb") as f:
            for chunk in backups.read_dump(store, manifest, None):
                f.write(chunk)
        pg_env, pg_bin = dict(os.environ), postgres.find_tool(db, "pg_restore").parent
        pg_env["PATH"] = f"{pg_bin}:{pg_env['PATH']}"
        plain_sql = work / f"{name}.sql.gz"
        timed(f"pg_dump -Fp '{dsn}' | gzip > {plain_sql}", pg_env)

        service = settings.controller("api")
        service.start()
        wait_until_ready(f"http://127.0.0.1:{port}", deadline_seconds=60, interval=0.2)
        with psycopg.connect(dsn) as conn:
            conn.execute("DELETE FROM order_items WHERE id % 5 = 0")
        os.sync()  # each way starts with the files above on disk, not being written back
        say("  the flow ...")
        result = database_recovery("orders", auto_approve=True)
        steps = result.steps
        restore = steps.get("restore into a new database", 0.0)
        checks = steps.get("verify against the manifest", 0.0) + steps.get("check the promoted database", 0.0)
        out["flow"] = {"rto": result.rto_seconds, "outage": result.outage_seconds, "pg_restore_step": restore,
                       "checks": checks, "steps": steps}
        service.stop()

        os.sync()
        say("  raw steps (pg_restore -j2, two renames) ...")
        raw_db = f"{name}_raw"
        t_restore = timed(f"pg_restore -j2 --exit-on-error --no-owner -d '{new_database(admin, raw_db)}' "
                          f"{archive}", pg_env)
        t_rename = rename_pair(admin, name, f"{name}_rawold", raw_db, name)
        out["raw"] = {"rto": t_restore + t_rename, "outage": t_rename, "pg_restore": t_restore}

        say("  manual procedure (stop the service, gunzip | psql, rename, start it) ...")
        manual_db = f"{name}_manual"
        service.start()
        wait_until_ready(f"http://127.0.0.1:{port}", deadline_seconds=60, interval=0.2)
        target = new_database(admin, manual_db)
        os.sync()
        t0 = time.monotonic()
        service.stop()  # the reference scales the API to 0 first
        t_psql = timed(f"gunzip -c {plain_sql} | psql -q -v ON_ERROR_STOP=1 -d '{target}' > /dev/null", pg_env)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" RENAME TO "{name}_manualold"')
            conn.execute(f'ALTER DATABASE "{manual_db}" RENAME TO "{name}"')
        service.start()
        wait_until_ready(f"http://127.0.0.1:{port}", deadline_seconds=60, interval=0.05)
        t_manual = time.monotonic() - t0
        service.stop()
        out["manual"] = {"rto": t_manual, "outage": t_manual, "psql": t_psql}
    finally:
        if service is not None:
            service.stop()
        with psycopg.connect(admin, autocommit=True) as conn:
            for (db_name,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                           (f"{name}%",)).fetchall():
                conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
    return out


def main() -> int:
    from demo.sample_data import rows_for_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg-dsn", default=os.environ.get("RUNBOOKS_TEST_PG",
                                                           "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--sizes", type=int, nargs="*", help="row counts (default: 100,000 and ~1 GB)")
    args = parser.parse_args()
    sizes = args.sizes or [100_000, rows_for_size(1 << 30)]
    work = Path(tempfile.mkdtemp(prefix="runbooks-bench-recovery-"))
    results = []
    try:
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=60):
            for rows in sizes:
                say(f"size {rows:,} rows")
                results.append(bench_size(args.pg_dsn, rows, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say()
    say(f"{'size':>10} {'flow RTO':>9} {'raw RTO':>8} {'manual':>8} {'flow/raw':>8} {'flow/man':>8} "
        f"{'outage flow':>11} {'raw':>6} {'manual':>7} {'overhead':>9} {'of it svc':>9} {'content cost':>12}")
    for r in results:
        f, raw, man = r["flow"], r["raw"], r["manual"]
        overhead = f["rto"] - f["pg_restore_step"] - f["checks"]
        service = f["steps"].get("stop writes", 0.0) + f["steps"].get("start the services and wait for /ready", 0.0)
        cost = r["backup_seconds_with_content"] - r["backup_seconds_counts_only"]
        say(f"{r['db_bytes'] / 2**20:>8.0f}MB {f['rto']:>8.1f}s {raw['rto']:>7.1f}s {man['rto']:>7.1f}s "
            f"{f['rto'] / raw['rto']:>8.2f} {f['rto'] / man['rto']:>8.2f} {f['outage']:>10.1f}s "
            f"{raw['outage']:>5.2f}s {man['outage']:>6.1f}s {100 * overhead / f['rto']:>8.0f}% {service:>8.1f}s "
            f"{cost:>+11.1f}s")
    say()
    say("overhead: the flow's RTO minus its pg_restore step and its count and content checks "
        "(target < 10 %), of it svc: stopping the service and starting it until /ready; content cost: backup time with 1 % content checksums minus without")
    (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
    (REPO / "benchmarks" / "results" / "recovery.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
