"""Runbook: remove backups past their retention (daily)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from prefect import flow
from pydantic import BaseModel

from flows._common import announce
from tasks import backups
from tasks.concurrency import exclusive
from tasks.config import load_settings
from tasks.notify import Severity
from tasks.report import RunReport, human_bytes

ORPHAN_AGE = timedelta(days=1)  # older than any backup still being written


class RetentionResult(BaseModel):
    dry_run: bool
    kept: dict[str, list[str]] = {}
    deleted: dict[str, list[str]] = {}
    orphans: dict[str, list[str]] = {}
    freed_bytes: int = 0


@flow(name="backup-retention", log_prints=True)
def backup_retention(database: str | None = None, dry_run: bool = False) -> RetentionResult:
    """Delete backups older than each database's `retention_days` (default 30).

    Use: daily (scheduled). Never deletes the newest verified backup of a database, nor
    its newest backup of all. Applies to the primary store and its replica (where the
    primary's restore-test records count: a replica copy of the newest verified backup
    stays too).
    Steps, per database (all configured ones unless `database` is given):
      1. list its backups in each store, newest first;
      2. select those past the retention window, less the ones always kept;
      3. delete each (manifest first, so a half-deleted backup is never listed);
      4. remove orphans: folders of the database with no manifest, untouched for a day
         (left by a backup that failed and could not clean up after itself).
    `dry_run` lists what would go and deletes nothing.
    """
    settings = load_settings()
    names = [settings.database(database).name] if database else sorted(settings.databases)
    now = datetime.now(timezone.utc)
    result = RetentionResult(dry_run=dry_run)
    verb = "would delete" if dry_run else "deleting"
    with RunReport("Backup retention", database or "all databases") as run:
        try:
            for name in names:
                db = settings.database(name)
                primary = db.config.store or ""
                replica = settings.store(primary).replica
                with exclusive("database", name):
                    verified: dict[str, backups.Verification] = {}
                    for store_name in [primary] + ([replica] if replica else []):
                        store = settings.open_store(store_name)
                        label = f"{name}@{store_name}"
                        with run.step(f"select {label}") as step:
                            entries = backups.list_backups(store, name)
                            for b in entries:  # the primary's test records also hold for copies
                                if b.verification is None and b.manifest.id in verified:
                                    b.verification = verified[b.manifest.id]
                            verified.update({b.manifest.id: b.verification for b in entries
                                             if b.verification})
                            gone = backups.expired(entries, now, db.config.retention_days)
                            stray = backups.orphans(store, name, now - ORPHAN_AGE)
                            step.detail = (f"{len(entries)} backups, {len(gone)} older than "
                                           f"{db.config.retention_days} days, {len(stray)} orphans")
                        result.deleted[label] = [b.manifest.id for b in gone]
                        result.kept[label] = [b.manifest.id for b in entries if b not in gone]
                        result.orphans[label] = stray
                        result.freed_bytes += sum(b.manifest.stored_bytes for b in gone)
                        for b in gone:
                            print(f"{label}: {verb} {b.manifest.id} "
                                  f"({b.manifest.finished_at:%Y-%m-%d %H:%M} UTC, "
                                  f"{human_bytes(b.manifest.stored_bytes)})")
                        for backup_id in stray:
                            print(f"{label}: {verb} orphan {backup_id} (no manifest)")
                        if not dry_run and (gone or stray):
                            with run.step(f"delete {len(gone) + len(stray)} from {label}"):
                                for backup_id in [b.manifest.id for b in gone] + stray:
                                    backups.delete_backup(store, backup_id)
            total = sum(len(v) for v in result.deleted.values())
            run.figure("Backups " + ("to delete" if dry_run else "deleted"), total)
            run.figure("Orphans " + ("to remove" if dry_run else "removed"),
                       sum(len(v) for v in result.orphans.values()))
            run.figure("Space " + ("to free" if dry_run else "freed"), human_bytes(result.freed_bytes))
            if dry_run:
                run.outcome = "planned (dry run)"
            return result
        except Exception as exc:
            run.outcome = "failed"
            announce(settings, run, Severity.MEDIUM, "Backup retention failed.", failed=exc)
            raise
