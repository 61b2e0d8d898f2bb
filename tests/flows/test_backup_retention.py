"""Retention through Prefect: the dry run deletes nothing; the real run keeps the newest
verified backup and the newest of all."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from flows.backup_database import backup_database
from flows.backup_retention import backup_retention
from tasks import backups
from tasks.config import load_settings
from tests.flows.test_backup_and_restore import local_config


def _age(store, backup_id: str, days: int, verified: bool | None = None) -> None:
    m = backups.load_manifest(store, backup_id)
    when = datetime.now(timezone.utc) - timedelta(days=days)
    backups.save_manifest(store, m.model_copy(update={"started_at": when, "finished_at": when}))
    if verified is not None:
        backups.save_verification(store, backups.Verification(
            backup_id=backup_id, passed=verified, checked_at=when, time_to_verified_seconds=1))


def test_retention_dry_run_then_real(sample_db, tmp_path, write_config):
    write_config(local_config(sample_db, tmp_path / "store", extra="retention_days = 30"))
    ids = [backup_database("orders").backup_id for _ in range(4)]
    store = load_settings().open_store("primary")
    _age(store, ids[0], 60)                 # old: goes
    _age(store, ids[1], 50, verified=True)  # old but the newest verified: stays
    _age(store, ids[2], 40, verified=False)  # old, failed its test: goes
    # ids[3] is new: stays

    plan = backup_retention(dry_run=True)
    assert sorted(plan.deleted["orders@primary"]) == sorted([ids[0], ids[2]])
    assert len(backups.list_backups(store)) == 4  # nothing deleted

    done = backup_retention(database="orders")
    assert sorted(done.deleted["orders@primary"]) == sorted([ids[0], ids[2]])
    assert sorted(b.manifest.id for b in backups.list_backups(store)) == sorted([ids[1], ids[3]])
    assert store.list(f"{ids[0]}/") == []  # the dump went too, not only the manifest
    assert done.freed_bytes > 0
