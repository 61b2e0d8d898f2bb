"""Runbook: prove a backup restores (the weekly restore test)."""

from __future__ import annotations

import secrets
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import BaseModel

from flows._common import announce
from tasks import backups, postgres
from tasks.backup_tasks import (create_scratch, drop_scratch, fail_verification, fetch_and_check,
                                restore_into_scratch, run_amcheck, verify_restored)
from tasks.backups import Verification
from tasks.concurrency import current_run, exclusive
from tasks.config import load_settings
from tasks.journal import Journal
from tasks.recovery import settle_abandoned
from tasks.errors import DatabaseError, IntegrityError, VerificationError
from tasks.notify import Severity
from tasks.report import RunReport, first_line, human_bytes
from tasks.storage import Store

RESTORE_STEP = "restore into scratch database"


class RestoreTestResult(BaseModel):
    database: str
    backup_id: str
    passed: bool
    dry_run: bool = False
    time_to_verified_seconds: float = 0.0
    restore_seconds: float = 0.0
    stored_bytes: int = 0
    rows_checked: int = 0
    tables_checked: int = 0
    amcheck: str | None = None
    plan: list[str] = []


@flow(name="restore-test", log_prints=True)
def restore_test(database: str, backup_id: str | None = None, dry_run: bool = False) -> RestoreTestResult:
    """Restore a backup into a scratch database and prove it matches its manifest.

    Use: weekly (scheduled), after a backup configuration change, or before relying on
    a backup in an incident. Steps:
      1. pick the backup: the given id, or the newest one of the database;
      2. integrity first: download, sha256, decryption, decompression, pg_restore --list;
         a backup that fails here is never restored;
      3. pg_restore --exit-on-error (parallel jobs) into a new scratch database on the
         same server;
      4. exact row counts and sequences compared with the manifest (the data is verified:
         the RTO clock stops here); then pg_amcheck where available (a failure still fails
         the test);
      5. the scratch database is dropped, whatever happened; the outcome is recorded in
         the store (a backup is "verified" only after this passed).
    Reports the time from start to verified: the measured RTO for this size.
    Holds the database's slot (no backup or retention meanwhile). `dry_run` picks the
    backup, checks the server and prints the plan, restoring nothing. Notifies HIGH on
    failure, INFO on success.

    Args:
        database: The database target whose backup is tested (a name from runbooks.toml).
        backup_id: One backup to test, e.g. orders-20260101T000000Z-ab12; empty: the newest.
        dry_run: Pick the backup, check the server and print the plan; restore nothing.
    """
    settings = load_settings()
    db = settings.database(database)
    if backup_id is not None:
        backups.check_backup_id(backup_id)  # before any store is touched
    store = settings.open_store(db.config.store)
    enc = settings.encryption(db.config.store)

    with RunReport("Restore test", database) as run:
        scratch = f"{db.dbname[:40]}_restoretest_{secrets.token_hex(3)}"
        manifest = None
        try:
            if dry_run:  # no lock: a plan must not wait behind a running backup
                return _plan(run, db, _select(run, store, database, backup_id), scratch, settings.spool_dir)
            with exclusive("database", database):
                t0 = time.monotonic()  # the RTO clock starts once nothing else holds the database
                record = Journal.begin(store, database, "restore-test")
                with run.step("settle earlier runs") as step:
                    step.detail = "; ".join(settle_abandoned(settings, db, store, print, own=record.record.id)) \
                        or "nothing left behind"
                manifest = _select(run, store, database, backup_id)
                with run.step("integrity (sha256, decompress, pg_restore --list)") as step:
                    spooled = fetch_and_check(db, store, manifest, enc, settings.spool_dir)
                    step.detail = f"{spooled.entries} archive entries"
                try:
                    with run.step("create scratch database") as step:
                        step.detail = scratch
                        record.creating(scratch)
                        create_scratch(db, scratch)
                    with run.step(RESTORE_STEP) as step:
                        step.detail = f"pg_restore --jobs={db.config.jobs} --exit-on-error"
                        restore_seconds = restore_into_scratch(db, spooled, scratch)
                    spooled.close()
                    with run.step("compare with manifest") as step:
                        problems = verify_restored(db, scratch, manifest)
                        content = (f", {len(manifest.content)} content checksums" if manifest.content else
                                   ", no content checksums in this backup")
                        step.detail = (f"{len(manifest.tables)} tables, {manifest.total_rows} rows, "
                                       f"{len(manifest.sequences)} sequences{content}: "
                                       + ("all match" if not problems else f"{len(problems)} differ"))
                        if problems:
                            raise fail_verification(manifest, problems)
                    # Data verified: the restored database is usable from here on (RTO).
                    verified_after = time.monotonic() - t0
                    with run.step("pg_amcheck") as step:
                        amcheck = run_amcheck(db, scratch)
                        step.detail = amcheck or "not available here (skipped)"
                    amcheck_seconds = time.monotonic() - t0 - verified_after
                finally:
                    spooled.close()
                    if _drop(run, db, scratch):
                        record.finish("dropped its scratch database")
            run.figure("Restore (pg_restore)", f"{restore_seconds:.1f} s")
            run.figure("Time to verified (measured RTO)", f"{verified_after:.1f} s")
            run.figure("Rows checked", f"{manifest.total_rows} in {len(manifest.tables)} tables")
            run.figure("pg_amcheck", f"{amcheck}, {amcheck_seconds:.1f} s (after the RTO clock)"
                       if amcheck else "not available")
            backups.save_verification(store, Verification(
                backup_id=manifest.id, passed=True, checked_at=datetime.now(timezone.utc),
                time_to_verified_seconds=verified_after, restore_seconds=restore_seconds,
                amcheck=amcheck, flow_run_id=current_run()[0]))
            print(f"Restore test of {manifest.id}: verified in {verified_after:.1f} s "
                  f"({manifest.total_rows} rows match the manifest)")
            run.outcome = "passed"
            announce(settings, run, Severity.INFO, f"Backup {manifest.id} restores and matches its manifest.")
            return RestoreTestResult(
                database=database, backup_id=manifest.id, passed=True,
                time_to_verified_seconds=verified_after, restore_seconds=restore_seconds,
                stored_bytes=manifest.stored_bytes, rows_checked=manifest.total_rows,
                tables_checked=len(manifest.tables), amcheck=amcheck)
        except Exception as exc:
            run.outcome = "failed"
            if manifest is not None and _backup_is_at_fault(run, exc):
                _record_failure(store, manifest.id, exc)
            announce(settings, run, Severity.HIGH,
                     f"Restore test of {db.describe()} failed; its backups may not restore.", failed=exc)
            raise


def _select(run: RunReport, store: Store, database: str, backup_id: str | None) -> backups.Manifest:
    with run.step("select backup") as step:
        manifest = backups.find_backup(store, database, backup_id).manifest
        step.detail = (f"{manifest.id} ({human_bytes(manifest.stored_bytes)}, "
                       f"taken {manifest.finished_at:%Y-%m-%d %H:%M} UTC)")
    run.figure("Backup", manifest.id)
    run.figure("Stored size", human_bytes(manifest.stored_bytes))
    return manifest


def _drop(run: RunReport, db: postgres.Database, scratch: str) -> bool:
    """Drop the scratch database; if that fails while another error is on its way, say so
    in the log and let the first error through (it is the one that matters). A scratch
    database left behind stays in the run's record: the next run drops it."""
    failing = sys.exc_info()[1]
    try:
        with run.step("drop scratch database"):
            drop_scratch(db, scratch)
        return True
    except Exception as exc:
        if failing is None:
            raise
        get_run_logger().warning("scratch database %s is left behind for the next run to drop: %s",
                                 scratch, first_line(exc))
        return False


def _backup_is_at_fault(run: RunReport, exc: Exception) -> bool:
    """A corrupt or unreadable archive, a mismatch, pg_amcheck findings or a failed
    pg_restore condemn the backup; an outage of the store, KMS or the server, or a
    scratch database that cannot be created, does not (the next test tries again)."""
    failed = [s.name for s in run.steps if s.outcome == "failed"]
    restore_failed = RESTORE_STEP in failed and isinstance(exc, DatabaseError)  # not an outage
    return isinstance(exc, (IntegrityError, VerificationError)) or restore_failed


def _plan(run: RunReport, db: postgres.Database, manifest: backups.Manifest, scratch: str,
          work_dir: Path) -> RestoreTestResult:
    with run.step("check server"):
        can_create = postgres.can_create_database(db)
    plan = [f"check {manifest.object_key} (sha256, decompress, pg_restore --list) into an unnamed "
            f"file in {work_dir} "
            f"(needs {human_bytes(manifest.dump_bytes)} free)",
            f"restore into {scratch} on {db.describe()}"
            + ("" if can_create else " (WARNING: this role cannot CREATE DATABASE)"),
            f"compare {len(manifest.tables)} tables / {manifest.total_rows} rows with the manifest, "
            "pg_amcheck, drop the scratch database"]
    run.outcome = "planned (dry run)"
    for line in plan:
        print(f"Plan: {line}")
    return RestoreTestResult(database=db.name, backup_id=manifest.id, passed=False, dry_run=True, plan=plan)


def _record_failure(store: Store, backup_id: str, exc: Exception) -> None:
    """Record a failed test so `backups list` stops calling the backup verified.

    A backup that passed once and still matches its sha256 cannot have gone bad: a later
    failure other than an integrity one is the environment's (server, tools), so it does
    not overwrite the passed record (retention keeps relying on it)."""
    try:
        earlier = backups.load_verification(store, backup_id)
        if earlier is not None and earlier.passed and not isinstance(exc, IntegrityError):
            get_run_logger().warning("backup %s passed an earlier restore test; this failure is "
                                     "not recorded against it: %s", backup_id, first_line(exc))
            return
        backups.save_verification(store, Verification(
            backup_id=backup_id, passed=False, checked_at=datetime.now(timezone.utc),
            time_to_verified_seconds=0.0, mismatches=[first_line(exc)], flow_run_id=current_run()[0]))
    except Exception:  # noqa: BLE001 - the store may be what failed; the run fails anyway
        pass
