"""Retention through Prefect: the dry run deletes nothing; the real run keeps the newest
verified backup and the newest of all."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from flows.backup_database import backup_database
from flows.backup_retention import backup_retention
from tasks import backups
from tasks.approval import NotApproved
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

    done = backup_retention(database="orders", auto_approve=True)
    assert done.approved_by == "auto_approve"
    assert sorted(done.deleted["orders@primary"]) == sorted([ids[0], ids[2]])
    assert sorted(b.manifest.id for b in backups.list_backups(store)) == sorted([ids[1], ids[3]])
    assert store.list(f"{ids[0]}/") == []  # the dump went too, not only the manifest
    assert done.freed_bytes > 0


def test_replica_keeps_the_newest_verified_and_orphans_go(sample_db, tmp_path, write_config):
    import os

    write_config(local_config(sample_db, tmp_path / "store", extra="retention_days = 30").replace(
        'path = "', 'replica = "dr"\npath = "') + f'\n[stores.dr]\nkind = "local"\npath = "{tmp_path / "dr"}"\n')
    ids = [backup_database("orders").backup_id for _ in range(3)]
    settings = load_settings()
    primary, dr = settings.open_store("primary"), settings.open_store("dr")
    for store in (primary, dr):
        _age(store, ids[0], 60)
        _age(store, ids[1], 50)
    # only the primary holds restore-test records
    backups.save_verification(primary, backups.Verification(
        backup_id=ids[1], passed=True, checked_at=datetime.now(timezone.utc), time_to_verified_seconds=1))
    old_orphan = tmp_path / "dr" / "orders-20200101T000000Z-abcd" / "dump.zst"
    new_orphan = tmp_path / "dr" / "orders-20261123T000000Z-beef" / "dump.zst"
    for path in (old_orphan, new_orphan):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"half a backup")
    os.utime(old_orphan, (0, 0))

    done = backup_retention(database="orders", auto_approve=True)
    assert done.deleted == {"orders@primary": [ids[0]], "orders@dr": [ids[0]]}
    assert done.orphans == {"orders@primary": [], "orders@dr": ["orders-20200101T000000Z-abcd"]}
    assert sorted(b.manifest.id for b in backups.list_backups(dr)) == sorted(ids[1:])
    assert not old_orphan.exists() and new_orphan.exists()


def _answer_when_paused(run_input: dict) -> threading.Thread:
    """Resume the first paused flow run with `run_input`, as a person in the UI would."""
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    def answer() -> None:
        for _ in range(300):
            with get_client(sync_client=True) as client:
                # Plain API call: prefect 3.8.8's read_flow_runs sends nulls this server rejects.
                runs = client.request("POST", "/flow_runs/filter", json={
                    "flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}},
                    "limit": 1, "offset": 0, "sort": "START_TIME_DESC"}).json()
            if runs:
                try:
                    resume_flow_run(runs[0]["id"], run_input=run_input)
                    return
                except RuntimeError as e:  # PAUSED is set just before the form's schema is stored
                    if "schema not found" not in str(e):
                        raise
            time.sleep(0.2)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return thread


def test_deletion_waits_for_approval(sample_db, tmp_path, write_config):
    write_config(local_config(sample_db, tmp_path / "store", extra="retention_days = 30"))
    ids = [backup_database("orders").backup_id for _ in range(2)]
    store = load_settings().open_store("primary")
    _age(store, ids[0], 60)

    answer = _answer_when_paused({"approve": False, "approver": "bob", "reason": "not today"})
    with pytest.raises(NotApproved, match="not approved.*bob: not today.*nothing changed"):
        backup_retention(database="orders")
    answer.join()
    assert len(backups.list_backups(store)) == 2  # declined: nothing deleted

    answer = _answer_when_paused({"approve": True, "approver": "alice", "reason": "monthly cleanup"})
    done = backup_retention(database="orders")
    answer.join()
    assert done.approved_by == "alice" and done.deleted["orders@primary"] == [ids[0]]
    assert [b.manifest.id for b in backups.list_backups(store)] == [ids[1]]
