"""The cross-region copy: a second pgBackRest repository in S3 (moto over TLS), with
SSE-KMS and pgBackRest's own encryption; WAL goes to both repositories and a point in
time restores from the copy alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import boto3
import psycopg

from flows.pitr_backup import pitr_backup
from flows.pitr_restore import pitr_restore
from tests.pitr_cluster import moto_tls, pitr_cluster, writes_around_a_target


def test_the_s3_copy_is_encrypted_and_restores_a_point_in_time_on_its_own(moto_endpoint, bucket, kms_key, tmp_path):
    with moto_tls(tmp_path, moto_endpoint) as endpoint, pitr_cluster(
            "pitrs3", s3={"bucket": bucket, "endpoint": endpoint, "kms_key": kms_key}) as cluster:
        cluster.sql("CREATE TABLE t (id int, note text)")
        r = pitr_backup("pitrs3", type="full")
        assert [s.repo for s in r.sets] == [1, 2] and all(s.type == "full" for s in r.sets)
        target = writes_around_a_target(cluster)

        s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="dr-copy/pgbackrest/")["Contents"]]
        wal = [k for k in keys if "/archive/pitrs3/" in k and k.endswith(".zst")]
        assert wal and any("/backup/pitrs3/" in k for k in keys)
        head = s3.head_object(Bucket=bucket, Key=wal[0])
        assert head["ServerSideEncryption"] == "aws:kms" and kms_key in head["SSEKMSKeyId"]
        body = s3.get_object(Bucket=bucket, Key=wal[0])["Body"].read()
        assert not body.startswith(b"\x28\xb5\x2f\xfd")  # not bare zstd: pgBackRest encrypted it
        assert body.startswith(b"Salted__")  # OpenSSL-style aes-256-cbc

        local = cluster.base / "repo" / "pgbackrest"
        local.rename(cluster.base / "repo-lost")  # the copy must stand alone
        got = pitr_restore("pitrs3", target_time=target.isoformat(), repo=2)
        try:
            with psycopg.connect(f"postgresql://postgres@127.0.0.1:{got.port}/app") as conn:
                assert conn.execute("SELECT id, note FROM t").fetchall() == [(1, "before")]
        finally:
            cluster.pg_ctl("stop", "-m", "fast", data_dir=Path(got.data_dir))
            shutil.rmtree(got.data_dir)
            (cluster.base / "repo-lost").rename(local)

