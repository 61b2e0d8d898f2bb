"""The Prefect tasks of the backup, restore-test and retention runbooks.

Each task is one step an operator would name: dump to the store, check integrity,
copy to the replica, restore into a scratch database, compare with the manifest.
Transient failures are retried (tasks.retries); everything else fails at once.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import backups, postgres
from tasks.backups import Manifest, ReplicaCopy
from tasks.encryption import EncryptionConfig, key_id
from tasks.errors import IntegrityError, VerificationError
from tasks.postgres import Database, DatabaseState
from tasks.progress import Progress
from tasks.retries import RETRY_OPTIONS
from tasks.storage import Store, copy_object
from tasks.streams import ahead


@task(name="dump-to-store", cache_policy=NO_CACHE, **RETRY_OPTIONS)
def dump_to_store(db: Database, store: Store, backup_id: str,
                  enc: EncryptionConfig | None) -> Manifest:
    """pg_dump in an exported snapshot -> zstd -> (AES-256-GCM) -> store, streamed.

    Returns the manifest draft (not yet saved: the backup is not listed until the
    integrity check passed). A failure leaves no object behind."""
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    key = backups.data_key(backup_id, enc is not None)
    estimate = postgres.estimate_dump_bytes(db)
    with postgres.dump(db) as stream:
        with Progress(f"pg_dump {db.name} (about {estimate >> 20} MB)", total=estimate) as progress:
            put, dump_bytes = backups.write_dump(store, key, stream.chunks, db.config.compression_level,
                                                 enc, on_bytes=progress.advance)
    seconds = max(time.monotonic() - t0, 1e-6)
    state: DatabaseState = stream.state
    return Manifest(
        id=backup_id, database=db.name, dbname=db.dbname, object_key=key,
        compression_level=db.config.compression_level,
        encryption=enc.mode if enc else None, key_id=key_id(enc),
        server_version=state.server_version, pg_dump_version=stream.pg_dump_version,
        tables=state.tables, sequences=state.sequences, db_size_bytes=state.size_bytes,
        content=state.content, sample_percent=state.sample_percent,
        dump_bytes=dump_bytes, stored_bytes=put.size, sha256=put.sha256,
        started_at=started, finished_at=datetime.now(timezone.utc), duration_seconds=seconds,
        throughput_mb_s=dump_bytes / seconds / 1e6,
    )


@task(name="check-integrity", cache_policy=NO_CACHE, **RETRY_OPTIONS)
def check_integrity(db: Database, store: Store, manifest: Manifest,
                    enc: EncryptionConfig | None) -> int:
    """Re-read the stored object: sha256, decryption, decompression and `pg_restore --list`.
    Returns the number of archive entries."""
    with Progress(f"integrity {manifest.id}", total=manifest.stored_bytes) as progress:
        plain = backups.read_dump(store, manifest, enc, on_bytes=progress.advance)
        entries = postgres.restore_list(db, None, stdin_chunks=plain)
        for _ in plain:  # pg_restore --list needs only the header; finish the checksum
            pass
    if not entries:
        raise IntegrityError(f"backup {manifest.id}: the archive lists no entries")
    return len(entries)


@task(name="copy-to-replica", cache_policy=NO_CACHE, **RETRY_OPTIONS)
def copy_to_replica(source: Store, replica: Store, manifest: Manifest) -> ReplicaCopy:
    """Copy the backup to the replica store and prove the copy by its sha256."""
    put = copy_object(source, replica, manifest.object_key)
    if put.sha256 != manifest.sha256:
        replica.delete(manifest.object_key)
        raise IntegrityError(f"backup {manifest.id}: replica copy in {replica.describe()} has "
                             f"sha256 {put.sha256[:12]}..., expected {manifest.sha256[:12]}...")
    copy = ReplicaCopy(store=replica.name, sha256=put.sha256, copied_at=datetime.now(timezone.utc))
    backups.save_manifest(replica, manifest.model_copy(
        update={"replica": copy, "server_side_encryption": replica.sse_kms_key_id}))
    return copy


@dataclass
class SpooledDump:
    """A checked archive in a file that has no name: only this process (and the tools it
    hands the descriptor to) can reach it, and the kernel frees it when the process
    ends, SIGKILL included, so no decrypted backup is ever left on disk."""

    fd: int
    entries: int
    seconds: float

    @property
    def path(self) -> Path:
        """The name PostgreSQL's tools open it by (pass `fd` to them: pass_fds)."""
        return Path(f"/proc/self/fd/{self.fd}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def anonymous_file(work_dir: Path) -> int:
    """A new file in `work_dir` that never has a name (O_TMPFILE), or one unlinked at
    once where the filesystem lacks O_TMPFILE. `work_dir` is created private (0700)."""
    work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        return os.open(work_dir, os.O_TMPFILE | os.O_RDWR, 0o600)
    except (AttributeError, OSError):
        fd, name = tempfile.mkstemp(prefix="runbooks-spool-", dir=work_dir)
        os.unlink(name)
        return fd


@task(name="fetch-and-check", cache_policy=NO_CACHE, **RETRY_OPTIONS)
def fetch_and_check(db: Database, store: Store, manifest: Manifest,
                    enc: EncryptionConfig | None, work_dir: Path) -> SpooledDump:
    """Download, check (sha256, decryption, decompression) and spool the archive to an
    anonymous file in `work_dir`, then `pg_restore --list` it. Any failure closes the
    file: nothing is restored from bytes that did not check out."""
    t0 = time.monotonic()
    spool = SpooledDump(fd=anonymous_file(work_dir), entries=0, seconds=0.0)
    try:
        with open(spool.fd, "wb", closefd=False) as f, \
                Progress(f"download {manifest.id}", total=manifest.stored_bytes) as p:
            # Three stages in three threads: download and sha256, decryption and zstd, writing.
            for chunk in ahead(backups.read_dump(store, manifest, enc, on_bytes=p.advance), name="decompress"):
                f.write(chunk)
        spool.entries = len(postgres.restore_list(db, spool.path, pass_fds=(spool.fd,)))
    except BaseException:
        spool.close()
        raise
    spool.seconds = time.monotonic() - t0
    return spool


@task(name="create-scratch", cache_policy=NO_CACHE, **RETRY_OPTIONS)
def create_scratch(db: Database, scratch: str) -> None:
    """Create the empty scratch database (on the same server as the production one)."""
    if not postgres.database_exists(db, scratch):
        postgres.create_database(db, scratch)


@task(name="restore-into-scratch", cache_policy=NO_CACHE)
def restore_into_scratch(db: Database, spool: SpooledDump, scratch: str) -> float:
    """pg_restore into the scratch database (--exit-on-error, parallel jobs)."""
    t0 = time.monotonic()
    postgres.pg_restore(db, scratch, spool.path, jobs=db.config.jobs, pass_fds=(spool.fd,))
    return time.monotonic() - t0


def compare_with_manifest(restored: DatabaseState, manifest: Manifest) -> list[str]:
    """Every difference between a restored database and its manifest, one line each.

    Row counts must match exactly. A sequence must be at least the manifest's value:
    sequences are not transactional, so pg_dump may read a later value than the
    snapshot did, never an earlier one."""
    problems = []
    for table, expected in sorted(manifest.tables.items()):
        got = restored.tables.get(table)
        if got is None:
            problems.append(f"{table}: missing (expected {expected} rows)")
        elif got != expected:
            problems.append(f"{table}: {got} rows, manifest says {expected}")
    for table in sorted(set(restored.tables) - set(manifest.tables)):
        problems.append(f"{table}: not in the manifest")
    for seq, expected in sorted(manifest.sequences.items()):
        got = restored.sequences.get(seq)
        if got is None:
            problems.append(f"sequence {seq}: missing")
        elif got < expected:
            problems.append(f"sequence {seq}: {got}, manifest says {expected}")
    return problems


@task(name="verify-restored", cache_policy=NO_CACHE)
def verify_restored(db: Database, scratch: str, manifest: Manifest) -> list[str]:
    """Exact row counts and sequences of the scratch database against the manifest, and
    the checksums of the sampled rows where the manifest has them."""
    with postgres.connect(db, dbname=scratch) as conn:
        state = postgres.read_state(conn, db.config.schemas)
        conn.rollback()
        content = postgres.content_sample(conn, db.config.schemas, manifest.sample_percent,
                                          tables=list(manifest.content))
    return compare_with_manifest(state, manifest) + postgres.compare_content(manifest.content, content)


@task(name="amcheck", cache_policy=NO_CACHE)
def run_amcheck(db: Database, scratch: str) -> str | None:
    """pg_amcheck the restored heap and B-tree indexes, where the tool is available."""
    return postgres.amcheck(db, scratch)


@task(name="drop-scratch", cache_policy=NO_CACHE, **RETRY_OPTIONS)
def drop_scratch(db: Database, scratch: str) -> None:
    """Drop the scratch database (idempotent)."""
    postgres.drop_database(db, scratch)


def fail_verification(manifest: Manifest, problems: list[str]) -> VerificationError:
    shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
    return VerificationError(f"backup {manifest.id}: restored database differs from the manifest: {shown}")
