"""`make demo`: the runbooks end to end, with nothing installed.

Starts an embedded PostgreSQL 16 (pgserver), builds the sample `orders` database,
runs the backup flow and the restore-test flow through Prefect (its local server on
SQLite, kept in .demo/prefect so `make ui` can show the runs afterwards), then starts
the demo API service under the process controller, makes it hang and runs the
service-restart flow; then a data-loss drill: rows deleted while the service runs,
recovered by the data-loss flow. Prints a short summary and stops what it started.

    python -m demo [--rows N]      (default 100,000; DEMO_ROWS works too)
"""

from __future__ import annotations

from deployments.environment import quiet_prefect

quiet_prefect()

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HOME = Path(os.environ.get("DEMO_HOME", ".demo")).resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=int(os.environ.get("DEMO_ROWS", 100_000)),
                        help="rows in the sample database (default 100,000)")
    args = parser.parse_args(argv)
    if args.rows < 1000:
        parser.error("--rows must be at least 1000")

    os.environ["PREFECT_HOME"] = str(HOME / "prefect")
    os.environ.pop("PREFECT_API_URL", None)  # always the demo's own local server
    for old in ("pg", "backups"):
        shutil.rmtree(HOME / old, ignore_errors=True)
    HOME.mkdir(parents=True, exist_ok=True)

    import pgserver
    import psycopg

    from demo.sample_data import build
    from tasks.report import human_bytes

    step("starting the embedded PostgreSQL")
    server = pgserver.get_server(HOME / "pg", cleanup_mode="stop")
    try:
        socket_dir = HOME / "pg"
        admin = f"host={socket_dir} user=postgres dbname=postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE orders")
            version = conn.execute("SHOW server_version").fetchone()[0]
        dsn = f"host={socket_dir} user=postgres dbname=orders"
        step(f"building the sample database 'orders' ({args.rows:,} rows)")
        counts = build(dsn, rows=args.rows)
        config = HOME / "runbooks.toml"
        bin_dir = Path(pgserver.__file__).parent / "pginstall" / "bin"
        config.write_text(f"""# Written by `make demo`: the embedded PostgreSQL and a local backup store.
[databases.orders]
dsn = "{dsn}"
bin_dir = "{bin_dir}"

[stores.local]
kind = "local"
path = "backups"
""")
        os.environ["RUNBOOKS_CONFIG"] = str(config)

        step("starting Prefect's local server (runs kept in .demo/prefect)")
        from flows._common import tidy_logs
        from flows.backup_database import backup_database
        tidy_logs()
        from flows.restore_test import restore_test

        step("running the backup-database flow")
        t0 = time.monotonic()
        backup = backup_database(database="orders")
        backup_wall = time.monotonic() - t0
        step("running the restore-test flow")
        test = restore_test(database="orders")
        restart = _restart_drill(config, dsn)
        drill = _data_loss_drill(dsn)
    finally:
        server.cleanup()  # stops the embedded PostgreSQL

    print(f"""
Demo summary
  database      orders on embedded PostgreSQL {version}: {sum(counts.values()):,} rows in {len(counts)} tables
  backup        {backup.backup_id}
                {human_bytes(backup.dump_bytes)} dump -> {human_bytes(backup.stored_bytes)} stored (zstd), \
{backup.throughput_mb_s:.0f} MB/s, {backup.seconds:.1f} s dump+upload ({backup_wall:.1f} s for the flow, Prefect server start included)
                integrity: sha256 ok, {backup.archive_entries} archive entries listed by pg_restore
  restore test  {"PASSED" if test.passed else "FAILED"}: {test.rows_checked:,} rows in {test.tables_checked} tables \
match the manifest; pg_amcheck {test.amcheck or "not available"}
                {test.time_to_verified_seconds:.1f} s from start to verified restore (the measured RTO at this size)
  service       demo API under the process controller, hang injected: {restart}
  data loss     {drill}
  files         backups in {HOME / "backups"}, config in {config}
  runs          `make ui`, then http://127.0.0.1:4200/runs: every flow run with its report (Artifacts tab)
  also try      RUNBOOKS_CONFIG={config} .venv/bin/runbooks backups list
""")
    return 0


def _restart_drill(config: Path, dsn: str) -> str:
    """Start the demo service, make it hang, and let runbook 1 bring it back."""
    import httpx
    import redis

    from demo.service import runbooks_section
    from flows.service_restart import service_restart
    from tasks.config import load_settings
    from tasks.probes import wait_until_ready

    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=0.5).ping()
        cache = "redis://127.0.0.1:6379/0"
    except redis.RedisError:
        cache = "none"  # no Redis here: the service runs without a cache (no rate limits)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(config, "a") as f:
        f.write(runbooks_section(dsn, port, config.parent, redis_url=cache, watch_seconds=5))
    controller = load_settings().controller("api")
    step(f"starting the demo API service on port {port} (process controller, cache: {cache})")
    controller.start()
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", deadline_seconds=30, interval=0.2)
        step("injecting a hang, then running the service-restart flow")
        httpx.post(f"http://127.0.0.1:{port}/admin/fault", json={"mode": "hang"}, timeout=5)
        result = service_restart(service="api")
    finally:
        controller.stop()
    return (f"restarted, ready in {result.seconds_to_ready:.1f} s, healthy (5 s watch) after "
            f"{result.seconds_to_healthy:.1f} s")


def _data_loss_drill(dsn: str) -> str:
    """Delete rows while the demo service runs, and let the data-loss flow (runbook 2)
    restore the verified backup and swap it in."""
    import psycopg

    from flows.data_loss import data_loss
    from tasks.config import load_settings
    from tasks.probes import wait_until_ready

    settings = load_settings()
    controller = settings.controller("api")
    step("data-loss drill: the service runs, a bad script deletes every fifth order item")
    controller.start()
    try:
        wait_until_ready(settings.service("api").base_url, deadline_seconds=30, interval=0.2)
        with psycopg.connect(dsn) as conn:
            deleted = conn.execute("DELETE FROM order_items WHERE id % 5 = 0").rowcount
        step(f"deleted {deleted:,} rows of order_items; running the data-loss flow (auto-approved drill)")
        result = data_loss(database="orders", auto_approve=True, incident="DEMO-DRILL")
        with psycopg.connect(dsn) as conn:
            now = conn.execute("SELECT count(*) FROM order_items").fetchone()[0]
        with psycopg.connect(psycopg.conninfo.make_conninfo(dsn, dbname=result.pre_restore_database)) as conn:
            damaged = conn.execute("SELECT count(*) FROM order_items").fetchone()[0]
    finally:
        controller.stop()
    return (f"{now - damaged:,} rows of order_items recovered from {result.backup_id}; "
            f"RTO {result.rto_seconds:.1f} s, outage {result.outage_seconds:.1f} s (writes stopped to ready), "
            f"data-loss window {result.data_loss_window_seconds:.0f} s\n"
                f"                the damaged database is kept as {result.pre_restore_database}")


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
