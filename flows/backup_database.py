"""Runbook: back up a database (every 6 hours, or by hand before risky work)."""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow
from pydantic import BaseModel

from flows._common import announce
from tasks import backups, postgres
from tasks.backup_tasks import check_integrity, copy_to_replica, dump_to_store
from tasks.concurrency import exclusive
from tasks.config import load_settings
from tasks.notify import Severity
from tasks.report import RunReport, human_bytes
from tasks.storage import Store


class BackupResult(BaseModel):
    database: str
    store: str
    backup_id: str | None
    dry_run: bool = False
    stored_bytes: int = 0
    dump_bytes: int = 0
    seconds: float = 0.0
    throughput_mb_s: float = 0.0
    sha256: str = ""
    archive_entries: int = 0
    replica: str | None = None
    plan: list[str] = []


@flow(name="backup-database", log_prints=True)
def backup_database(database: str, dry_run: bool = False) -> BackupResult:
    """Back up a PostgreSQL database into its store, with a manifest that proves it.

    Use: on the 6-hourly schedule, or by hand before risky changes.
    Steps:
      1. pg_dump (custom format) in an exported snapshot, streamed through zstd
         (and AES-256-GCM when the store encrypts) into the store; exact row counts
         and sequence values are read in the same snapshot;
      2. integrity check: re-read the stored object (sha256, decompression,
         pg_restore --list); only then is the manifest written and the backup listed;
      3. copy to the replica store, when configured, checked by sha256.
    One backup per database at a time. `dry_run` checks the database and the store
    and prints the plan, changing nothing. Notifies on failure.

    Args:
        database: The database target to back up (a name from runbooks.toml).
        dry_run: Check the database and the store and print the plan; change nothing.
    """
    settings = load_settings()
    db = settings.database(database)
    store = settings.open_store(db.config.store)
    enc = settings.encryption(db.config.store)
    _, replica_name = settings.stores_for(db)
    replica = settings.open_store(replica_name) if replica_name else None

    with RunReport("Backup", database) as run:
        try:
            if dry_run:
                return _plan(run, db, store, replica)
            with exclusive("database", database):
                backup_id = backups.new_backup_id(database)
                run.figure("Backup id", backup_id)
                with run.step("dump to store"):
                    manifest = dump_to_store(db, store, backup_id, enc)
                try:
                    with run.step("integrity check") as step:
                        manifest.toc_entries = check_integrity(db, store, manifest, enc)
                        step.detail = f"{manifest.toc_entries} archive entries, sha256 ok"
                    manifest.integrity_checked_at = datetime.now(timezone.utc)
                    manifest.server_side_encryption = store.sse_kms_key_id
                    with run.step("write manifest"):
                        backups.save_manifest(store, manifest)
                except BaseException:
                    _discard(store, backup_id)  # never keep (or list) a backup that did not check out
                    raise
                _figures(run, manifest)
                if replica is not None:
                    with run.step(f"copy to replica '{replica.name}'") as step:
                        manifest.replica = copy_to_replica(store, replica, manifest)
                        backups.save_manifest(store, manifest)
                        step.detail = "sha256 matches"
                    run.figure("Replica", f"{replica.name} (sha256 verified)")
                run.outcome = "succeeded"
                announce(settings, run, Severity.INFO,
                         f"Backup {backup_id}: {human_bytes(manifest.stored_bytes)} stored, "
                         f"{manifest.throughput_mb_s:.0f} MB/s, {manifest.total_rows} rows, integrity checked.")
                return BackupResult(
                    database=database, store=store.name, backup_id=backup_id,
                    stored_bytes=manifest.stored_bytes, dump_bytes=manifest.dump_bytes,
                    seconds=manifest.duration_seconds, throughput_mb_s=manifest.throughput_mb_s,
                    sha256=manifest.sha256, archive_entries=manifest.toc_entries,
                    replica=replica.name if replica else None)
        except Exception as exc:
            run.outcome = "failed"
            announce(settings, run, Severity.HIGH, f"Backup of {db.describe()} failed.", failed=exc)
            raise


def _discard(store: Store, backup_id: str) -> None:
    """Remove what a failed backup wrote; if even that fails, retention removes the orphan."""
    try:
        backups.delete_backup(store, backup_id)
    except Exception:  # noqa: BLE001 - the original failure is what the operator needs
        pass


def _figures(run: RunReport, m: backups.Manifest) -> None:
    run.figure("Database size", human_bytes(m.db_size_bytes))
    run.figure("Dump size (uncompressed)", human_bytes(m.dump_bytes))
    run.figure("Stored size", human_bytes(m.stored_bytes))
    run.figure("Compression ratio", f"{m.dump_bytes / max(m.stored_bytes, 1):.1f}x")
    run.figure("Dump + upload", f"{m.duration_seconds:.1f} s")
    run.figure("Throughput", f"{m.throughput_mb_s:.1f} MB/s")
    run.figure("Rows (exact)", f"{m.total_rows} in {len(m.tables)} tables")
    run.figure("Client-side encryption", f"AES-256-GCM, {m.encryption} key {m.key_id}" if m.encryption else "none")
    run.figure("Server-side encryption", f"SSE-KMS ({m.server_side_encryption})" if m.server_side_encryption
               else "store default")
    run.figure("sha256", m.sha256)


def _plan(run: RunReport, db: postgres.Database, store: Store, replica: Store | None) -> BackupResult:
    plan = []
    with run.step("check database"):
        size = postgres.database_size(db)
        plan.append(f"dump {db.describe()} ({human_bytes(size)}) with "
                    f"{postgres.find_tool(db, 'pg_dump')}")
    with run.step("check store"):
        store.check()
        plan.append(f"write to {store.describe()}, then check integrity and write the manifest")
    if replica is not None:
        with run.step("check replica"):
            replica.check()
            plan.append(f"copy to {replica.describe()} and check its sha256")
    run.outcome = "planned (dry run)"
    for line in plan:
        print(f"Plan: {line}")
    return BackupResult(database=db.name, store=store.name, backup_id=None, dry_run=True, plan=plan)
