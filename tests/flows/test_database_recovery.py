"""Runbook 2 through Prefect: the real PostgreSQL here, the demo service under the
process controller as the application, and the faults the issue names."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from flows.backup_database import backup_database
from flows.database_recovery import database_recovery
from flows.restore_test import restore_test
from tasks import backups, journal, postgres
from tasks.config import load_settings
from tasks.errors import BackupNotFound, InvalidBackupId
from tasks.probes import wait_until_ready
from tasks.recovery import RecoveryError
from tests.conftest import free_port


def config(tmp_path, dsn: str, port: int | None = None, extra: str = "") -> str:
    text = f"""
[databases.orders]
dsn = "{dsn}"
[stores.local]
kind = "local"
path = "{tmp_path / 'store'}"
"""
    if port:
        argv = ", ".join(f'"{a}"' for a in [sys.executable, "-m", "demo.service", "--dsn", dsn,
                                              "--port", str(port), "--redis", "none"])
        text += f"""
[services.api]
base_url = "http://127.0.0.1:{port}"
database = "orders"
ready_deadline_seconds = 20
controller = {{ kind = "process", command = [{argv}], pid_file = "{tmp_path / 'api.pid'}", log_file = "{tmp_path / 'api.log'}", grace_seconds = 5 }}
"""
    return text + extra


def counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return postgres.read_state(conn, ["public"]).tables


def checksums(dsn: str) -> dict:
    with psycopg.connect(dsn) as conn:
        return {t: c.checksum for t, c in postgres.content_sample(conn, ["public"], 100).items()}


def databases_like(admin: str, dsn: str, infix: str) -> list[str]:
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(admin) as conn:
        return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1",
                                           (f"{dbname}{infix}%",)).fetchall()]


@pytest.fixture
def api(sample_db, tmp_path, write_config):
    """The demo service on the sample database, started; stopped after the test."""
    port = free_port()
    write_config(config(tmp_path, sample_db, port))
    ctl = load_settings().controller("api")
    ctl.start()
    wait_until_ready(f"http://127.0.0.1:{port}", deadline_seconds=20, interval=0.2)
    yield ctl, f"http://127.0.0.1:{port}"
    ctl.stop()


def verified_backup() -> str:
    backup_id = backup_database("orders").backup_id
    assert restore_test("orders", backup_id=backup_id).passed
    return backup_id


def test_recovers_deleted_rows_with_the_service_running(api, sample_db, pg_admin):
    ctl, url = api
    backup_id = verified_backup()
    good = counts(sample_db)
    with psycopg.connect(sample_db) as conn:
        conn.execute("DELETE FROM order_items WHERE id % 3 = 0")
        conn.execute("INSERT INTO audit_logs (action) SELECT 'written after the backup' FROM generate_series(1, 5)")
    pid = ctl.status().pid

    result = database_recovery("orders", auto_approve=True, incident="INC-42")

    assert result.recovered and result.backup_id == backup_id
    assert counts(sample_db) == good
    assert ctl.status().running and ctl.status().pid != pid  # stopped for the swap, started again
    assert any("order_items" in line and "-" in line for line in result.assessment)
    aside = result.pre_restore_database
    assert aside and aside in databases_like(pg_admin, sample_db, "_pre_restore_")
    kept = counts(psycopg.conninfo.make_conninfo(sample_db, dbname=aside))
    assert kept["public.order_items"] < good["public.order_items"]
    assert any("audit_logs" in line and "above the restored maximum" in line for line in result.reconciliation)
    assert 0 < result.outage_seconds < result.rto_seconds
    assert result.data_loss_window_seconds > 0
    assert databases_like(pg_admin, sample_db, "_restore_") == []
    store = load_settings().open_store("local")
    assert journal.unfinished(store, "orders") == []
