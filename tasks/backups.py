"""The backup catalog and object format: ids, manifests, verification records, the
dump -> zstd -> (encryption) -> store pipeline and its reverse, and retention.

Layout in a store, one folder per backup:
    <id>/dump.zst[.enc]      the pg_dump custom-format archive, zstd-compressed
    <id>/manifest.json       written last: a backup without one is not a backup
    <id>/verification.json   the outcome of the latest restore test
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta, timezone

import zstandard
from pydantic import BaseModel, Field

from tasks import encryption
from tasks.encryption import EncryptionConfig
from tasks.postgres import ContentSample
from tasks.errors import BackupNotFound, IntegrityError, InvalidBackupId, ObjectNotFound, StoreError
from tasks.storage import PutResult, Store
from tasks.streams import ahead

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MANIFEST = "manifest.json"
VERIFICATION = "verification.json"


class ReplicaCopy(BaseModel):
    store: str
    sha256: str
    copied_at: datetime


class Manifest(BaseModel):
    """What a backup holds and how to check it; written beside the dump."""

    id: str
    database: str
    dbname: str
    object_key: str
    format: str = "custom"
    compression: str = "zstd"
    compression_level: int = 3
    encryption: str | None = None
    key_id: str | None = None
    server_side_encryption: str | None = None  # the SSE-KMS key the store asked S3 for
    server_version: str = ""
    pg_dump_version: str = ""
    tables: dict[str, int] = Field(default_factory=dict)
    sequences: dict[str, int] = Field(default_factory=dict)
    # Checksums of a sample of each table's rows, taken in the dump's snapshot (older
    # backups have none: their restores compare counts and sequences only).
    content: dict[str, ContentSample] = Field(default_factory=dict)
    sample_percent: float = 0.0
    db_size_bytes: int = 0
    dump_bytes: int = 0
    stored_bytes: int = 0
    sha256: str = ""
    started_at: datetime
    finished_at: datetime
    duration_seconds: float = 0.0
    throughput_mb_s: float = 0.0
    toc_entries: int = 0
    integrity_checked_at: datetime | None = None
    replica: ReplicaCopy | None = None

    @property
    def total_rows(self) -> int:
        return sum(self.tables.values())


class Verification(BaseModel):
    """The outcome of a restore test of one backup."""

    backup_id: str
    passed: bool
    checked_at: datetime
    time_to_verified_seconds: float
    restore_seconds: float = 0.0
    mismatches: list[str] = Field(default_factory=list)
    amcheck: str | None = None
    flow_run_id: str | None = None


class Backup(BaseModel):
    """A catalog entry: the manifest and, if tested, the latest verification."""

    manifest: Manifest
    verification: Verification | None = None

    @property
    def verified(self) -> bool:
        return bool(self.verification and self.verification.passed)


def check_backup_id(backup_id: str) -> str:
    """Reject anything that is not a plain backup id before a store is touched."""
    if not isinstance(backup_id, str) or not ID_PATTERN.fullmatch(backup_id) or ".." in backup_id:
        raise InvalidBackupId(f"{backup_id!r} is not a backup id (letters, digits, '-', '_', '.'; "
                              "no paths)")
    return backup_id


def id_pattern(database: str) -> re.Pattern[str]:
    """The ids `new_backup_id` makes for `database`, and nothing else."""
    return re.compile(rf"{re.escape(database)}-\d{{8}}T\d{{6}}Z-[0-9a-f]{{4}}")


def new_backup_id(database: str, now: datetime | None = None) -> str:
    """`<database>-<UTC time>-<4 hex>`: sorts by time, unique even within one second."""
    now = now or datetime.now(timezone.utc)
    return check_backup_id(f"{database}-{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}")


def data_key(backup_id: str, encrypted: bool) -> str:
    return f"{check_backup_id(backup_id)}/dump.zst" + (".enc" if encrypted else "")


def _counted(chunks: Iterable[bytes], counter: list[int],
             on_bytes: Callable[[int], None] | None) -> Iterator[bytes]:
    for chunk in chunks:
        counter[0] += len(chunk)
        if on_bytes:
            on_bytes(len(chunk))
        yield chunk


def _compress(chunks: Iterable[bytes], level: int) -> Iterator[bytes]:
    # threads=1: zstd compresses in its own worker thread, overlapping our reading,
    # hashing and uploading (measured: benchmarks/backup_restore.py).
    comp = zstandard.ZstdCompressor(level=level, threads=1).compressobj(size=-1)
    for chunk in chunks:
        out = comp.compress(chunk)
        if out:
            yield out
    yield comp.flush()


def write_dump(store: Store, key: str, dump: Iterable[bytes], level: int,
               enc: EncryptionConfig | None,
               on_bytes: Callable[[int], None] | None = None) -> tuple[PutResult, int]:
    """Compress (and encrypt) a dump stream into the store; returns what was stored
    and the uncompressed size."""
    raw = [0]
    stream: Iterable[bytes] = _compress(_counted(dump, raw, on_bytes), level)
    if enc is not None:
        stream = encryption.encrypt(enc, stream)
    put = store.put_stream(key, stream)
    return put, raw[0]


def read_dump(store: Store, manifest: Manifest, enc: EncryptionConfig | None,
              on_bytes: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """The plain pg_dump archive of a backup, checked on the way.

    The sha256 of the stored bytes is compared at the end of the stream, and the zstd
    frame must be complete; either failure raises IntegrityError. Callers that must not
    act on unverified bytes consume the whole stream first (see `check_integrity`).
    """
    digest = hashlib.sha256()

    def stored() -> Iterator[bytes]:
        for chunk in store.get_stream(manifest.object_key):
            digest.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
            yield chunk
        if digest.hexdigest() != manifest.sha256:
            raise IntegrityError(f"backup {manifest.id}: sha256 of the stored object does not "
                                 f"match the manifest (stored object is corrupt)")

    stream: Iterator[bytes] = ahead(stored(), name="download")  # reading and sha256 overlap the rest
    if manifest.encryption:
        stream = encryption.decrypt(enc, stream)
    decomp = zstandard.ZstdDecompressor().decompressobj()
    try:
        for chunk in stream:
            out = decomp.decompress(chunk)
            if out:
                yield out
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"backup {manifest.id}: does not decompress: {exc}") from None
    if not decomp.eof:
        raise IntegrityError(f"backup {manifest.id}: compressed stream is truncated")


def manifest_key(backup_id: str) -> str:
    return f"{check_backup_id(backup_id)}/{MANIFEST}"


def save_manifest(store: Store, manifest: Manifest) -> None:
    store.put_bytes(manifest_key(manifest.id), manifest.model_dump_json(indent=2).encode())


def load_manifest(store: Store, backup_id: str) -> Manifest:
    try:
        data = store.get_bytes(manifest_key(backup_id))
    except ObjectNotFound:
        raise BackupNotFound(f"no backup {backup_id!r} in {store.describe()}") from None
    try:
        return Manifest.model_validate_json(data)
    except ValueError:
        raise IntegrityError(f"backup {backup_id}: manifest is unreadable") from None


def save_verification(store: Store, record: Verification) -> None:
    key = f"{check_backup_id(record.backup_id)}/{VERIFICATION}"
    store.put_bytes(key, record.model_dump_json(indent=2).encode())


def load_verification(store: Store, backup_id: str) -> Verification | None:
    try:
        return Verification.model_validate_json(store.get_bytes(f"{check_backup_id(backup_id)}/{VERIFICATION}"))
    except ObjectNotFound:
        return None
    except ValueError:
        return None  # unreadable: treated as never tested


def list_backups(store: Store, database: str | None = None) -> list[Backup]:
    """Every complete backup in the store (those with a manifest), newest first."""
    objects = store.list(f"{database}-" if database else "")
    have = {o.key for o in objects}
    out: list[Backup] = []
    for o in objects:
        backup_id, _, name = o.key.partition("/")
        if name != MANIFEST or not ID_PATTERN.fullmatch(backup_id):
            continue
        try:
            manifest = Manifest.model_validate_json(store.get_bytes(o.key))
        except (ValueError, StoreError):
            continue  # unreadable manifests are reported by `backups show`, not listed
        if database and manifest.database != database:
            continue
        verification = (load_verification(store, backup_id)
                        if f"{backup_id}/{VERIFICATION}" in have else None)
        out.append(Backup(manifest=manifest, verification=verification))
    return sorted(out, key=lambda b: b.manifest.finished_at, reverse=True)


def find_backup(store: Store, database: str, backup_id: str | None) -> Backup:
    """The given backup of `database`, or its newest one."""
    if backup_id:
        manifest = load_manifest(store, check_backup_id(backup_id))
        if manifest.database != database:
            raise BackupNotFound(f"backup {backup_id} belongs to database "
                                 f"{manifest.database!r}, not {database!r}")
        return Backup(manifest=manifest, verification=load_verification(store, backup_id))
    backups = list_backups(store, database)
    if not backups:
        raise BackupNotFound(f"no backups of database {database!r} in {store.describe()}")
    return backups[0]


def expired(backups: list[Backup], now: datetime, retention_days: int) -> list[Backup]:
    """Backups older than the retention window, never the newest verified one and never
    the newest one overall (so a database always keeps something to restore)."""
    cutoff = now - timedelta(days=retention_days)
    ordered = sorted(backups, key=lambda b: b.manifest.finished_at, reverse=True)
    keep = {ordered[0].manifest.id} if ordered else set()
    newest_verified = next((b for b in ordered if b.verified), None)
    if newest_verified:
        keep.add(newest_verified.manifest.id)
    return [b for b in ordered if b.manifest.finished_at < cutoff and b.manifest.id not in keep]


def orphans(store: Store, database: str, older_than: datetime) -> list[str]:
    """Ids of `database` whose folder holds objects but no manifest (a backup that failed
    and could not clean up, or an interrupted delete), untouched since `older_than`."""
    pattern = id_pattern(database)
    folders: dict[str, list[datetime]] = {}
    complete: set[str] = set()
    for o in store.list(f"{database}-"):
        backup_id, _, name = o.key.partition("/")
        if pattern.fullmatch(backup_id):
            folders.setdefault(backup_id, []).append(o.modified)
            if name == MANIFEST:
                complete.add(backup_id)
    return sorted(b for b, times in folders.items() if b not in complete and max(times) < older_than)


def delete_backup(store: Store, backup_id: str) -> None:
    """Remove a backup: its manifest first (so it stops being listed), then the rest."""
    check_backup_id(backup_id)
    store.delete(manifest_key(backup_id))
    for o in store.list(f"{backup_id}/"):
        store.delete(o.key)


