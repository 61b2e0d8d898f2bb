"""The backup catalog: ids, retention selection, and checks when reading a dump back."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from tasks import backups
from tasks.backups import Backup, Manifest, Verification
from tasks.errors import BackupNotFound, IntegrityError, InvalidBackupId
from tasks.storage import LocalStoreConfig, open_store

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


def _backup(days_old: float, verified: bool | None = None, name: str = "orders") -> Backup:
    t = NOW - timedelta(days=days_old)
    bid = f"{name}-{t:%Y%m%dT%H%M%SZ}-0000"
    v = None if verified is None else Verification(backup_id=bid, passed=verified, checked_at=t,
                                                   time_to_verified_seconds=1)
    return Backup(manifest=Manifest(id=bid, database=name, dbname=name, object_key=f"{bid}/dump.zst",
                                    started_at=t, finished_at=t), verification=v)


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "", "x" * 200, "a b", "orders-1/../../etc"])
def test_backup_ids_that_are_not(bad):
    with pytest.raises(InvalidBackupId):
        backups.check_backup_id(bad)


def test_new_ids_are_valid_and_sortable():
    a = backups.new_backup_id("orders", NOW)
    b = backups.new_backup_id("orders", NOW + timedelta(seconds=1))
    assert backups.check_backup_id(a) == a and a.startswith("orders-20261123T120000Z-") and a < b


def test_retention_drops_old_ones_but_keeps_newest_verified():
    old_verified = _backup(40, verified=True)
    older = _backup(45)
    old_failed = _backup(35, verified=False)
    recent = _backup(1)  # newest, not verified
    gone = backups.expired([recent, old_failed, old_verified, older], NOW, 30)
    assert {b.manifest.id for b in gone} == {older.manifest.id, old_failed.manifest.id}


def test_retention_never_empties_a_database():
    only_old = [_backup(100), _backup(90)]
    gone = backups.expired(only_old, NOW, 30)
    assert [b.manifest.id for b in gone] == [only_old[0].manifest.id]


def test_read_dump_rejects_a_flipped_byte(tmp_path):
    store = open_store("l", LocalStoreConfig(path=tmp_path))
    key = "b-1/dump.zst"
    put, raw = backups.write_dump(store, key, [b"PGDMP" + b"x" * 100_000], 3, None)
    m = _backup(0).manifest.model_copy(update={"id": "b-1", "object_key": key, "sha256": put.sha256})
    assert b"".join(backups.read_dump(store, m, None)) == b"PGDMP" + b"x" * 100_000
    path = tmp_path / key
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        b"".join(backups.read_dump(store, m, None))


def test_unknown_backup_is_named(tmp_path):
    store = open_store("l", LocalStoreConfig(path=tmp_path))
    with pytest.raises(BackupNotFound, match="no backup 'orders-x'"):
        backups.load_manifest(store, "orders-x")
    with pytest.raises(BackupNotFound, match="no backups of database 'orders'"):
        backups.find_backup(store, "orders", None)


def test_listing_ignores_objects_without_manifest(tmp_path):
    store = open_store("l", LocalStoreConfig(path=tmp_path))
    store.put_bytes("orders-20260101T000000Z-0000/dump.zst", b"half a backup")
    b = _backup(0)
    backups.save_manifest(store, b.manifest)
    assert [x.manifest.id for x in backups.list_backups(store)] == [b.manifest.id]
    backups.delete_backup(store, b.manifest.id)
    assert backups.list_backups(store) == []
