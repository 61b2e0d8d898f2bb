"""Runbook 2 through Prefect: the real PostgreSQL here, the demo service under the
process controller as the application, and the faults the issue names."""

from __future__ import annotations

import os
import re
import sys
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from demo.service import runbooks_section
from flows.backup_database import backup_database
from flows.database_recovery import database_recovery
from flows.restore_test import restore_test
from tasks import backups, journal, postgres
from tasks.config import load_settings
from tasks.errors import BackupNotFound, InvalidBackupId
from tasks.probes import wait_until_ready
from tasks.recovery import RecoveryError
from tests.conftest import free_port, need


def config(tmp_path, dsn: str, port: int | None = None, extra: str = "") -> str:
    text = f"""
[databases.orders]
dsn = "{dsn}"
[stores.local]
kind = "local"
path = "{tmp_path / 'store'}"
"""
    if port:
        text += runbooks_section(dsn, port, tmp_path, ready_deadline_seconds=20)
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


def verified_backup(restore: bool = False) -> str:
    """A new backup of `orders`, verified: by a real restore test, or (where the restore
    test is not what the test is about) by the record a passed one writes."""
    backup_id = backup_database("orders").backup_id
    if restore:
        assert restore_test("orders", backup_id=backup_id).passed
    else:
        backups.save_verification(load_settings().open_store("local"), backups.Verification(
            backup_id=backup_id, passed=True, checked_at=datetime.now(timezone.utc), time_to_verified_seconds=0))
    return backup_id


def test_recovers_deleted_rows_with_the_service_running(api, sample_db, pg_admin):
    ctl, url = api
    backup_id = verified_backup(restore=True)
    good = counts(sample_db)
    with psycopg.connect(sample_db) as conn:
        conn.execute("DELETE FROM order_items WHERE id % 3 = 0")
        conn.execute("INSERT INTO audit_logs (action) SELECT 'written after the backup' FROM generate_series(1, 5)")
    pid = ctl.status().pid

    result = database_recovery("orders", auto_approve=True, incident="INC-42")

    assert result.recovered and result.backup_id == backup_id
    assert result.cleaned_up == []  # nothing was left behind; its own record is not "settled"
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


def test_no_backup_is_a_clear_error_before_anything_stops(api, sample_db, pg_admin):
    ctl, _ = api
    pid = ctl.status().pid
    with pytest.raises(BackupNotFound, match="no backups of database 'orders'.*nothing was stopped"):
        database_recovery("orders", auto_approve=True)
    assert ctl.status().pid == pid
    assert databases_like(pg_admin, sample_db, "_") == []


def test_restore_points_choose_the_backup_and_bad_ones_are_refused(sample_db, tmp_path, write_config, pg_admin):
    write_config(config(tmp_path, sample_db))
    first = verified_backup()
    store = load_settings().open_store("local")
    first_done = backups.load_manifest(store, first).finished_at
    second = verified_backup()
    # Just before the second backup, said in another time zone: the first one is used.
    point = (first_done + timedelta(milliseconds=1)).astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert database_recovery("orders", restore_point=point, dry_run=True).backup_id == first
    assert database_recovery("orders", dry_run=True).backup_id == second
    with pytest.raises(BackupNotFound, match="no backup of 'orders' was taken at or before"):
        database_recovery("orders", restore_point=first_done - timedelta(hours=1), auto_approve=True)
    with pytest.raises(RecoveryError, match="in the future"):
        database_recovery("orders", restore_point=datetime.now(timezone.utc) + timedelta(hours=1))
    with pytest.raises(RecoveryError, match="has no time zone"):
        database_recovery("orders", restore_point=datetime(2026, 1, 1, 12, 0))
    with pytest.raises(InvalidBackupId):
        database_recovery("orders", backup_id="../../etc/passwd", auto_approve=True)
    assert databases_like(pg_admin, sample_db, "_restore") == []


def test_unverified_backups_need_an_explicit_backup_id(sample_db, tmp_path, write_config):
    write_config(config(tmp_path, sample_db))
    backup_id = backup_database("orders").backup_id
    with pytest.raises(RecoveryError, match=f"has passed a restore test \\(unverified: {backup_id}\\).*backup_id"):
        database_recovery("orders", auto_approve=True)
    result = database_recovery("orders", backup_id=backup_id, auto_approve=True)
    assert result.recovered and result.backup_id == backup_id


def test_a_corrupt_backup_is_skipped_for_the_next_older_verified_one(sample_db, tmp_path, write_config):
    write_config(config(tmp_path, sample_db))
    older = verified_backup()
    newer = verified_backup()
    store = load_settings().open_store("local")
    path = tmp_path / "store" / backups.load_manifest(store, newer).object_key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    result = database_recovery("orders", auto_approve=True)
    assert result.recovered and result.backup_id == older
    assert len(result.skipped_backups) == 1 and newer in result.skipped_backups[0]
    assert re.search("sha256 of the stored object does not match|does not decompress", result.skipped_backups[0])


def test_a_taken_restore_name_is_left_alone(sample_db, tmp_path, write_config, pg_admin, monkeypatch):
    from tasks import recovery

    write_config(config(tmp_path, sample_db))
    verified_backup()
    dbname = psycopg.conninfo.conninfo_to_dict(sample_db)["dbname"]
    taken = f"{dbname}_restore_taken"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{taken}"')
    monkeypatch.setattr(recovery, "derived_name", lambda prod, kind, at: taken if kind == recovery.RESTORED
                        else f"{prod}{kind}x")
    before = counts(sample_db)
    with pytest.raises(RecoveryError, match=f"{taken} already exists.*left alone"):
        database_recovery("orders", auto_approve=True)
    assert databases_like(pg_admin, sample_db, "_restore_") == [taken]  # not dropped
    assert counts(sample_db) == before


def test_an_unanswered_approval_changes_nothing(api, sample_db, pg_admin):
    from tasks.approval import NotApproved

    ctl, _ = api
    verified_backup()
    pid = ctl.status().pid
    with pytest.raises(NotApproved, match="nobody approved"):
        database_recovery("orders", approval_timeout_minutes=0.05)
    assert ctl.status().pid == pid  # never stopped
    assert databases_like(pg_admin, sample_db, "_restore_") == []  # the restored copy is dropped
    assert databases_like(pg_admin, sample_db, "_pre_restore_") == []
    assert journal.unfinished(load_settings().open_store("local"), "orders") == []


def test_a_service_that_does_not_come_back_is_undone(sample_db, tmp_path, write_config, pg_admin):
    """The first start after the swap fails: the swap is undone and production is the
    original database again, its data intact; the service runs again on it."""
    port, flag = free_port(), tmp_path / "fail-next-start"
    service = f"{sys.executable} -m demo.service --dsn '{sample_db}' --port {port} --redis none"
    wrapper = f'if [ -e {flag} ]; then rm {flag}; echo "bad start"; exit 3; fi; exec {service}'
    write_config(config(tmp_path, sample_db) + runbooks_section(
        sample_db, port, tmp_path, command=["sh", "-c", wrapper], ready_deadline_seconds=6))
    ctl = load_settings().controller("api")
    ctl.start()
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", deadline_seconds=20, interval=0.2)
        verified_backup()
        with psycopg.connect(sample_db) as conn:
            conn.execute("DELETE FROM orders WHERE id % 2 = 0 AND id NOT IN (SELECT order_id FROM order_items)")
        before, content = counts(sample_db), checksums(sample_db)
        flag.touch()
        # The bad start is seen at once (it exited before the controller looked) or at the
        # ready deadline, as the machine's timing has it: either way the swap is undone.
        with pytest.raises(Exception, match=r"not ready after|exited at once \(code 3\)"):
            database_recovery("orders", auto_approve=True)
        assert counts(sample_db) == before and checksums(sample_db) == content
        assert databases_like(pg_admin, sample_db, "_pre_restore_") == []
        assert databases_like(pg_admin, sample_db, "_restore_") == []
        assert ctl.status().running
        assert journal.unfinished(load_settings().open_store("local"), "orders") == []
    finally:
        ctl.stop()


def test_hostile_database_names_are_quoted(pg_admin, tmp_path, write_config):
    from demo.sample_data import build

    dbname = 'Orders "EU"; x'
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute('CREATE DATABASE "Orders ""EU""; x"')
    try:
        dsn = psycopg.conninfo.make_conninfo(pg_admin, dbname=dbname)
        build(dsn, rows=1000)
        write_config(config(tmp_path, dsn.replace('"', '\\"')).replace("[databases.orders]", "[databases.orders-eu]"))
        backup_id = backup_database("orders-eu").backup_id
        assert restore_test("orders-eu", backup_id=backup_id).passed
        with psycopg.connect(dsn) as conn:
            conn.execute("TRUNCATE order_items")
        result = database_recovery("orders-eu", auto_approve=True)
        assert result.recovered and counts(dsn)["public.order_items"] > 0
        assert result.pre_restore_database.startswith(dbname + "_pre_restore_")
    finally:
        with psycopg.connect(pg_admin, autocommit=True) as conn:
            for (name,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'Orders \"EU\"; x%'").fetchall():
                conn.execute(psycopg.sql.SQL("DROP DATABASE {} WITH (FORCE)").format(psycopg.sql.Identifier(name)))


def test_dry_run_changes_nothing(api, sample_db, pg_admin):
    ctl, _ = api
    backup_id = verified_backup()
    pid = ctl.status().pid
    result = database_recovery("orders", dry_run=True)
    assert result.dry_run and not result.recovered and result.backup_id == backup_id
    assert any("rename" in line for line in result.plan)
    assert ctl.status().pid == pid and databases_like(pg_admin, sample_db, "_") == []


def test_corruption_is_confirmed_before_anything_changes(api, sample_db, pg_admin):
    from flows.database_corruption import NoCorruptionFound, database_corruption

    ctl, _ = api
    verified_backup()
    pid, before = ctl.status().pid, counts(sample_db)
    with pytest.raises(NoCorruptionFound, match="no check found corruption.*force"):
        database_corruption("orders", check_query="SELECT count(*) FROM orders", auto_approve=True)
    assert ctl.status().pid == pid and counts(sample_db) == before
    assert databases_like(pg_admin, sample_db, "_") == []

    # A query that fails stands in for one that hits a corrupt page.
    result = database_corruption("orders", check_query="SELECT count(*) / 0 FROM orders", auto_approve=True)
    assert result.recovered and result.pre_restore_database
    assert ctl.status().running and ctl.status().pid != pid
    # before_restore: writes stopped before the restore, so the outage covers it too.
    assert result.outage_seconds > result.rto_seconds * 0.3


def test_data_loss_restores_only_the_named_tables_into_the_live_database(api, sample_db, pg_admin):
    """order_items goes back to the backup; audit_logs (written since) is untouched; the
    service never stops; the replaced rows are kept; an order written after the backup
    whose items are gone now is reported, not hidden."""
    from flows.data_loss import data_loss

    ctl, _ = api
    backup_id = verified_backup()
    good = counts(sample_db)
    with psycopg.connect(sample_db) as conn:
        conn.execute("DELETE FROM order_items WHERE id % 4 = 0")
        conn.execute("INSERT INTO audit_logs (action) SELECT 'written after the backup' FROM generate_series(1, 7)")
        order = conn.execute("INSERT INTO orders (user_id) SELECT min(id) FROM users RETURNING id").fetchone()[0]
        conn.execute("INSERT INTO order_items (order_id, sku, quantity, unit_price_cents) VALUES (%s, 'late', 1, 100)",
                     (order,))
    damaged, pid = counts(sample_db), ctl.status().pid

    result = data_loss("orders", tables=["order_items"], auto_approve=True)

    now = counts(sample_db)
    assert result.recovered and result.backup_id == backup_id
    assert now["public.order_items"] == good["public.order_items"]
    assert now["public.audit_logs"] == damaged["public.audit_logs"] == good["public.audit_logs"] + 7
    assert now["public.orders"] == damaged["public.orders"]
    assert ctl.status().pid == pid  # the service kept running
    aside = result.pre_restore_database.split("schema ")[1].rstrip(")")
    with psycopg.connect(sample_db) as conn:
        kept = conn.execute(f'SELECT count(*) FROM "{aside}".order_items').fetchone()[0]
        schemas = [r[0] for r in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'runbooks_%'")]
    assert kept == damaged["public.order_items"] and schemas == [aside]  # the staging schema is gone
    assert any("order_items" in line and "replaced rows" in line for line in result.reconciliation)
    assert result.outage_seconds < result.rto_seconds
    assert databases_like(pg_admin, sample_db, "_restore_") == []
    with psycopg.connect(sample_db) as conn:  # the checksums of the restored table are the backup's
        got = postgres.content_sample(conn, ["public"], 1.0, tables=["public.order_items"])
    manifest = backups.load_manifest(load_settings().open_store("local"), backup_id)
    assert got["public.order_items"] == manifest.content["public.order_items"]


def test_restoring_a_table_whose_parent_rows_are_newer_reports_the_dangling_rows(sample_db, tmp_path, write_config):
    from flows.data_loss import data_loss

    write_config(config(tmp_path, sample_db))
    verified_backup()
    with psycopg.connect(sample_db) as conn:
        order = conn.execute("INSERT INTO orders (user_id) SELECT min(id) FROM users RETURNING id").fetchone()[0]
        conn.execute("INSERT INTO order_items (order_id, sku, quantity, unit_price_cents) VALUES (%s, 'late', 1, 100)",
                     (order,))
    result = data_loss("orders", tables=["orders"], auto_approve=True)
    assert any("public.order_items: 1 rows reference public.orders rows that are not there" in line
               for line in result.reconciliation), result.reconciliation


def test_unknown_tables_are_refused_before_anything_changes(sample_db, tmp_path, write_config, pg_admin):
    from flows.data_loss import data_loss

    write_config(config(tmp_path, sample_db))
    verified_backup()
    with pytest.raises(RecoveryError, match="table 'invoices' is not in the backup.*public.orders"):
        data_loss("orders", tables=["invoices"], auto_approve=True)
    assert databases_like(pg_admin, sample_db, "_") == []


def test_the_next_run_drops_a_dead_table_restores_staging_schema(sample_db, tmp_path, write_config):
    """A table restore killed while staging left its schema in production; its record says
    so, and the next run of the database drops it (the swap is one transaction, so
    nothing else can be half done)."""
    from tasks.journal import Journal
    from tasks.recovery import settle_abandoned

    write_config(config(tmp_path, sample_db))
    settings = load_settings()
    store = settings.open_store("local")
    dead = Journal.begin(store, "orders", "data-loss")
    dead.note("staging tables", side_schema="runbooks_restore_20260101T000000Z",
              aside_schema="runbooks_pre_restore_20260101T000000Z")
    with psycopg.connect(sample_db, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "runbooks_restore_20260101T000000Z"')
        conn.execute('CREATE TABLE "runbooks_restore_20260101T000000Z".orders (LIKE public.orders)')
    mine = Journal.begin(store, "orders", "data-loss")  # the caller's own record
    said = settle_abandoned(settings, settings.database("orders"), store, lambda line: None, own=mine.record.id)
    assert any("dropped schema runbooks_restore_20260101T000000Z" in line for line in said), said
    assert [r.id for r in journal.unfinished(store, "orders")] == [mine.record.id]
    mine.finish("done")
    with psycopg.connect(sample_db) as conn:
        assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'runbooks_%'").fetchone()[0] == 0
    assert journal.unfinished(store, "orders") == []


def _damage_on_disk(dsn: str, table: str, block: int) -> None:
    """Overwrite line pointers of one heap page in the table's file, as a failing disk or
    controller would. PostgreSQL reads it from disk: no page of the database is in its
    buffers yet (it was copied at the file level)."""
    import struct
    from pathlib import Path

    with psycopg.connect(dsn) as conn:
        path = Path(conn.execute("SELECT current_setting('data_directory') || '/' || pg_relation_filepath(%s)",
                                 (table,)).fetchone()[0])
    if not os.access(path, os.W_OK):
        need(False, f"writing PostgreSQL's data files needs root or the postgres user ({path})")
    with open(path, "r+b") as f:
        f.seek(8192 * block)
        page = bytearray(f.read(8192))
        for i in range(8):  # items 1-8: LP_NORMAL, 200 bytes at an offset no tuple can have
            struct.pack_into("<I", page, 24 + 4 * i, 8100 | (1 << 15) | (200 << 17))
        f.seek(8192 * block)
        f.write(page)


def test_a_page_damaged_on_disk_is_found_by_pg_amcheck_and_the_database_recovered(
        sample_db, pg_admin, tmp_path, write_config):
    from flows.database_corruption import database_corruption

    write_config(config(tmp_path, sample_db))
    verified_backup()
    good, sums = counts(sample_db), checksums(sample_db)
    damaged = psycopg.conninfo.conninfo_to_dict(sample_db)["dbname"] + "_disk"
    with psycopg.connect(pg_admin, autocommit=True) as conn:  # a file-level copy: none of it in shared buffers
        conn.execute(f'CREATE DATABASE "{damaged}" TEMPLATE "{psycopg.conninfo.conninfo_to_dict(sample_db)["dbname"]}" '
                     "STRATEGY FILE_COPY")
    production = psycopg.conninfo.make_conninfo(sample_db, dbname=damaged)
    write_config(config(tmp_path, production))  # the same store: production is now the copy
    _damage_on_disk(production, "public.order_items", block=1)

    result = database_corruption("orders", auto_approve=True)

    assert result.recovered and result.pre_restore_database
    assert counts(production) == good and checksums(production) == sums
    report = load_settings()
    assert postgres.amcheck(report.database("orders"), damaged) == "ok"  # the promoted copy is sound
    with pytest.raises(Exception, match="pg_amcheck found problems.*order_items"):
        postgres.amcheck(report.database("orders"), result.pre_restore_database)  # kept aside as it was
