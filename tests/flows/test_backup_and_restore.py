"""The backup and restore-test runbooks through the Prefect engine, against the real
PostgreSQL here and S3/KMS on moto's server, with the faults the issue names."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import psycopg
import pytest

from flows.backup_database import backup_database
from flows.restore_test import restore_test
from tasks import backups, postgres
from tasks.config import load_settings
from tasks.errors import DatabaseError, DatabaseUnavailable, IntegrityError, InvalidBackupId, VerificationError
from tests.conftest import free_port
from tests.faults import FaultProxy


def local_config(dsn: str, store: Path, extra: str = "") -> str:
    return f"""
[databases.orders]
dsn = "{dsn}"
store = "primary"
{extra}
[stores.primary]
kind = "local"
path = "{store}"
"""


def s3_config(dsn: str, bucket: str, endpoint: str, store_extra: str = "", db_extra: str = "") -> str:
    return f"""
[databases.orders]
dsn = "{dsn}"
store = "s3"
{db_extra}
[stores.s3]
kind = "s3"
bucket = "{bucket}"
endpoint_url = "{endpoint}"
{store_extra}
"""


def counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return postgres.read_state(conn, ["public"]).tables


def scratch_databases(admin: str, dsn: str) -> list[str]:
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(admin) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                            (f"{dbname}_restoretest_%",)).fetchall()
    return [r[0] for r in rows]


def test_backup_then_restore_test(sample_db, pg_admin, tmp_path, write_config):
    write_config(local_config(sample_db, tmp_path / "store"))
    result = backup_database("orders")
    store = load_settings().open_store("primary")
    manifest = backups.load_manifest(store, result.backup_id)
    assert manifest.tables == counts(sample_db) and manifest.total_rows >= 3000
    assert manifest.sequences["public.orders_id_seq"] >= manifest.tables["public.orders"]
    assert result.sha256 == manifest.sha256 and manifest.toc_entries == result.archive_entries > 10
    assert (tmp_path / "store" / manifest.object_key).stat().st_size == manifest.stored_bytes

    assert not backups.list_backups(store)[0].verified
    tested = restore_test("orders")
    assert tested.passed and tested.backup_id == result.backup_id
    assert tested.rows_checked == manifest.total_rows
    assert 0 < tested.restore_seconds <= tested.time_to_verified_seconds
    with psycopg.connect(pg_admin) as conn:  # the embedded PostgreSQL ships no amcheck
        has_amcheck = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'amcheck'").fetchone()
    assert tested.amcheck == ("ok" if has_amcheck else None)
    assert backups.list_backups(store)[0].verified
    assert scratch_databases(pg_admin, sample_db) == []


def test_report_artifact_has_the_figures(sample_db, tmp_path, write_config):
    from prefect.client.orchestration import get_client

    write_config(local_config(sample_db, tmp_path / "store"))
    result = backup_database("orders")
    with get_client(sync_client=True) as client:
        # Plain API call: prefect 3.8.8's read_artifacts sends nulls this server rejects.
        arts = client.request("POST", "/artifacts/filter", json={
            "artifacts": {"key": {"any_": ["backup-orders"]}}, "sort": "CREATED_DESC",
            "limit": 1, "offset": 0}).json()
    text = arts[0]["data"]
    assert result.backup_id in text and "Throughput" in text and "| dump to store |" in text


def test_s3_with_kms_encryption_and_replica(sample_db, tmp_path, write_config, moto_endpoint, bucket, kms_key):
    write_config(f"""
[databases.orders]
dsn = "{sample_db}"
store = "s3"

[stores.s3]
kind = "s3"
bucket = "{bucket}"
prefix = "prod/db"
endpoint_url = "{moto_endpoint}"
sse_kms_key_id = "{kms_key}"
replica = "dr"
encryption = {{ mode = "kms", kms_key_id = "{kms_key}", kms_endpoint_url = "{moto_endpoint}" }}

[stores.dr]
kind = "local"
path = "{tmp_path / 'dr'}"
encryption = {{ mode = "kms", kms_key_id = "{kms_key}", kms_endpoint_url = "{moto_endpoint}" }}
""")
    result = backup_database("orders")
    settings = load_settings()
    s3, dr = settings.open_store("s3"), settings.open_store("dr")
    m = backups.load_manifest(s3, result.backup_id)
    assert m.encryption == "kms" and m.object_key.endswith(".enc") and m.replica.store == "dr"
    head = s3.client.head_object(Bucket=bucket, Key=f"prod/db/{m.object_key}")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert s3.get_bytes(m.object_key)[:8] == b"RBENC01\n"
    copy = backups.load_manifest(dr, result.backup_id)
    assert copy.sha256 == m.sha256 == backups.hashlib.sha256(dr.get_bytes(m.object_key)).hexdigest()
    assert restore_test("orders").passed


@pytest.fixture(scope="session")
def password_pg(tmp_path_factory):
    """An embedded PostgreSQL that checks passwords (scram), unlike the trust-auth server here."""
    import pgserver

    root = tmp_path_factory.mktemp("pgauth")
    root.chmod(0o777)
    server = pgserver.get_server(root / "data", cleanup_mode="stop")
    server.psql("ALTER USER postgres PASSWORD 'right-password';")
    hba = Path(root / "data" / "pg_hba.conf")
    hba.write_text("local all all scram-sha-256\n")
    server.psql("SELECT pg_reload_conf();")
    yield root / "data"
    server.cleanup()


def test_wrong_password_names_the_target_and_hides_the_password(password_pg, tmp_path, write_config):
    store = tmp_path / "store"
    write_config(local_config(f"postgresql://postgres:wr0ng-s3cret@/postgres?host={password_pg}", store))
    with pytest.raises(DatabaseError) as err:
        backup_database("orders")
    msg = str(err.value)
    assert msg.startswith("database 'orders' (") and "password authentication failed" in msg
    assert "wr0ng-s3cret" not in msg and "password=***" in msg and "\n" not in msg
    assert not store.exists() or list(store.rglob("*")) == []


def test_refused_connection_is_one_clear_line(tmp_path, write_config):
    write_config(local_config(f"postgresql://app:pa55-word@127.0.0.1:{free_port()}/orders", tmp_path / "s"))
    with pytest.raises(DatabaseUnavailable, match=r"^database 'orders' .*cannot connect.*refused") as err:
        backup_database("orders")
    assert "pa55-word" not in str(err.value)


def _wrapped_tools(tmp_path: Path, dsn: str, pg_dump_body: str) -> Path:
    """A bin_dir whose pg_dump is a wrapper around the real one (the rest are the real tools)."""
    real = postgres.find_tool(postgres.Database("x", postgres.DatabaseConfig(dsn=dsn)), "pg_dump").parent
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("pg_restore", "pg_amcheck"):
        (bin_dir / tool).symlink_to(real / tool)
    script = bin_dir / "pg_dump"
    script.write_text(f"#!/bin/bash\nREAL={real}/pg_dump\n{pg_dump_body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_pg_dump_dying_mid_stream_aborts_the_upload(make_database, tmp_path, write_config,
                                                    moto_endpoint, bucket):
    from demo.sample_data import build

    dsn = make_database()
    build(dsn, rows=120_000)  # a dump of several S3 parts
    bin_dir = _wrapped_tools(tmp_path, dsn, '"$REAL" "$@" | head -c 6000000\nexit 1')
    write_config(s3_config(dsn, bucket, moto_endpoint, store_extra="part_size_mb = 5",
                           db_extra=f'bin_dir = "{bin_dir}"'))
    with pytest.raises(DatabaseError, match=r"pg_dump failed \(exit 1\)"):
        backup_database("orders")
    s3 = load_settings().open_store("s3")
    assert s3.list() == [] and backups.list_backups(s3) == []
    assert s3.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_store_failing_for_a_moment_is_retried(sample_db, tmp_path, write_config, moto_endpoint, bucket):
    proxy = FaultProxy(moto_endpoint)
    try:
        write_config(s3_config(sample_db, bucket, proxy.url, store_extra="max_attempts = 3"))
        proxy.fail_next = 5  # more than one call's attempts: the task retry takes over
        result = backup_database("orders")
        assert proxy.failures_sent == 5
        assert backups.list_backups(load_settings().open_store("s3"))[0].manifest.id == result.backup_id
    finally:
        proxy.close()


def test_store_failing_for_good_fails_clearly_and_notifies(sample_db, tmp_path, write_config,
                                                           moto_endpoint, bucket, slack):
    proxy = FaultProxy(moto_endpoint)
    try:
        write_config(s3_config(sample_db, bucket, proxy.url, store_extra=f"""max_attempts = 2
[notify]
slack_token = "xoxb-never-shown"
slack_channel = "#dr"
slack_api_url = "{slack.url}"
"""))
        proxy.fail_always = True
        with pytest.raises(Exception, match=r"store 's3' .*InternalError.*after 2 attempts"):
            backup_database("orders")
        assert proxy.failures_sent >= 8  # 2 attempts per call, 4 task attempts
    finally:
        proxy.close()
    [req] = slack.requests
    assert req["body"]["channel"] == "#dr" and "[HIGH] Backup failed: orders" in req["body"]["text"]
    assert "xoxb-never-shown" not in json.dumps(req["body"])


def test_flipped_byte_fails_integrity_and_restores_nothing(sample_db, pg_admin, tmp_path, write_config):
    write_config(local_config(sample_db, tmp_path / "store"))
    bid = backup_database("orders").backup_id
    assert restore_test("orders").passed  # a corrupted object loses its earlier pass
    obj = tmp_path / "store" / bid / "dump.zst"
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x01
    obj.write_bytes(bytes(data))
    # Whichever check meets the flip first: zstd's own (a flip in a block header or its
    # checksum) or the stored object's sha256 at the end of the stream.
    with pytest.raises(IntegrityError, match="sha256 of the stored object does not match|does not decompress"):
        restore_test("orders")
    assert scratch_databases(pg_admin, sample_db) == []
    store = load_settings().open_store("primary")
    [entry] = backups.list_backups(store)
    assert not entry.verified and entry.verification.passed is False


def test_row_counts_differing_from_manifest_fail_and_name_tables(sample_db, pg_admin, tmp_path, write_config):
    write_config(local_config(sample_db, tmp_path / "store"))
    bid = backup_database("orders").backup_id
    store = load_settings().open_store("primary")
    m = backups.load_manifest(store, bid)
    m.tables["public.orders"] += 1
    m.tables["public.users"] -= 2
    backups.save_manifest(store, m)
    with pytest.raises(VerificationError) as err:
        restore_test("orders", backup_id=bid)
    assert "public.orders" in str(err.value) and "public.users" in str(err.value)
    assert "public.api_keys" not in str(err.value)
    assert scratch_databases(pg_admin, sample_db) == []  # dropped although verification failed


def test_two_backups_of_one_database_do_not_overlap(sample_db, tmp_path, write_config):
    bin_dir = _wrapped_tools(tmp_path, sample_db, 'sleep 1.5\nexec "$REAL" "$@"')
    write_config(local_config(sample_db, tmp_path / "store", extra=f'bin_dir = "{bin_dir}"'))
    results, errors = [], []

    def run() -> None:
        try:
            results.append(backup_database("orders"))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and len(results) == 2
    store = load_settings().open_store("primary")
    a, b = sorted((backups.load_manifest(store, r.backup_id) for r in results), key=lambda m: m.started_at)
    assert a.finished_at <= b.started_at, "the second dump started before the first finished"


def test_invalid_backup_id_is_rejected_before_the_store(sample_db, tmp_path, write_config):
    write_config(s3_config(sample_db, "unreachable", f"http://127.0.0.1:{free_port()}"))
    for bad in ("../../etc/passwd", "orders/../x", "a b"):
        with pytest.raises(InvalidBackupId, match="is not a backup id"):
            restore_test("orders", backup_id=bad)


def test_dry_run_changes_nothing(sample_db, tmp_path, write_config):
    write_config(local_config(sample_db, tmp_path / "store"))
    result = backup_database("orders", dry_run=True)
    assert result.dry_run and result.backup_id is None and len(result.plan) == 2
    assert backups.list_backups(load_settings().open_store("primary")) == []
    assert os.listdir(tmp_path / "store") == []


def test_restore_test_dry_run_restores_nothing(sample_db, pg_admin, tmp_path, write_config):
    write_config(local_config(sample_db, tmp_path / "store"))
    bid = backup_database("orders").backup_id
    plan = restore_test("orders", dry_run=True)
    assert plan.dry_run and plan.backup_id == bid and not plan.passed and len(plan.plan) == 3
    assert scratch_databases(pg_admin, sample_db) == []
    assert backups.load_verification(load_settings().open_store("primary"), bid) is None


def test_an_archive_pg_restore_cannot_read_condemns_the_backup(sample_db, pg_admin, tmp_path, write_config):
    """The object checks out (sha256, zstd) but is no pg_dump archive: nothing is restored."""
    write_config(local_config(sample_db, tmp_path / "store"))
    good = backup_database("orders").backup_id
    store = load_settings().open_store("primary")
    m = backups.load_manifest(store, good)
    bad_id = backups.new_backup_id("orders")
    put, raw = backups.write_dump(store, backups.data_key(bad_id, False), [b"not an archive" * 1000], 3, None)
    backups.save_manifest(store, m.model_copy(update={
        "id": bad_id, "object_key": backups.data_key(bad_id, False), "sha256": put.sha256,
        "stored_bytes": put.size, "dump_bytes": raw}))
    with pytest.raises(IntegrityError, match="archive is unreadable"):
        restore_test("orders", backup_id=bad_id)
    assert scratch_databases(pg_admin, sample_db) == []
    assert backups.load_verification(store, bad_id).passed is False


def test_a_passed_backup_keeps_its_record_when_a_later_test_fails_elsewhere(sample_db, tmp_path, write_config):
    """Not an integrity failure: the object still matches its sha256, so the earlier pass stands
    (retention keeps relying on it); the failure is still raised and notified."""
    write_config(local_config(sample_db, tmp_path / "store"))
    bid = backup_database("orders").backup_id
    assert restore_test("orders").passed
    store = load_settings().open_store("primary")
    m = backups.load_manifest(store, bid)
    m.tables["public.orders"] += 1
    backups.save_manifest(store, m)
    with pytest.raises(VerificationError):
        restore_test("orders")
    assert backups.load_verification(store, bid).passed is True
