"""Runbook: remove backups past their retention (daily)."""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow
from pydantic import BaseModel

from flows._common import announce
from tasks import backups
from tasks.concurrency import exclusive
from tasks.config import load_settings
from tasks.notify import Severity
from tasks.report import RunReport, human_bytes


class RetentionResult(BaseModel):
    dry_run: bool
    kept: dict[str, list[str]] = {}
    deleted: dict[str, list[str]] = {}
    freed_bytes: int = 0


@flow(name="backup-retention", log_prints=True)
def backup_retention(database: str | None = None, dry_run: bool = False) -> RetentionResult:
    """Delete backups older than each database's `retention_days` (default 30).

    Use: daily (scheduled). Never deletes the newest verified backup of a database, nor
    its newest backup of all. Applies to the primary store and its replica.
    Steps, per database (all configured ones unless `database` is given):
      1. list its backups in each store, newest first;
      2. select those past the retention window, less the ones always kept;
      3. delete each (manifest first, so a half-deleted backup is never listed).
    `dry_run` lists what would go and deletes nothing.
    """
    settings = load_settings()
    names = [settings.database(database).name] if database else sorted(settings.databases)
    now = datetime.now(timezone.utc)
    result = RetentionResult(dry_run=dry_run)
    with RunReport("Backup retention", database or "all databases") as run:
        try:
            for name in names:
                db = settings.database(name)
                store_names = [db.config.store]
                replica = settings.store(db.config.store).replica
                if replica:
                    store_names.append(replica)
                with exclusive("database", name):
                    for store_name in store_names:
                        store = settings.open_store(store_name)
                        label = f"{name}@{store_name}"
                        with run.step(f"select {label}") as step:
                            entries = backups.list_backups(store, name)
                            gone = backups.expired(entries, now, db.config.retention_days)
                            step.detail = (f"{len(entries)} backups, {len(gone)} older than "
                                           f"{db.config.retention_days} days")
                        result.deleted[label] = [b.manifest.id for b in gone]
                        result.kept[label] = [b.manifest.id for b in entries if b not in gone]
                        result.freed_bytes += sum(b.manifest.stored_bytes for b in gone)
                        for b in gone:
                            verb = "would delete" if dry_run else "deleting"
                            print(f"{label}: {verb} {b.manifest.id} "
                                  f"({b.manifest.finished_at:%Y-%m-%d %H:%M} UTC, "
                                  f"{human_bytes(b.manifest.stored_bytes)})")
                            if not dry_run:
                                with run.step(f"delete {b.manifest.id}"):
                                    backups.delete_backup(store, b.manifest.id)
            total = sum(len(v) for v in result.deleted.values())
            run.figure("Backups " + ("to delete" if dry_run else "deleted"), total)
            run.figure("Space " + ("to free" if dry_run else "freed"), human_bytes(result.freed_bytes))
            if dry_run:
                run.outcome = "planned (dry run)"
            return result
        except Exception as exc:
            run.outcome = "failed"
            announce(settings, run, Severity.MEDIUM, "Backup retention failed.", failed=exc)
            raise
