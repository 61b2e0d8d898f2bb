"""Stores: local directory and S3 (moto's server over HTTP), the same contract for both."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import boto3
import pytest

from tasks.errors import StoreError, TransientStoreError
from tasks.storage import LocalStoreConfig, S3StoreConfig, copy_object, open_store
from tests.conftest import free_port
from tests.faults import FaultProxy


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store("primary", LocalStoreConfig(path=tmp_path / "store"))
    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = request.getfixturevalue("bucket")
    return open_store("primary", S3StoreConfig(kind="s3", bucket=bucket, prefix="pre/fix",
                                               endpoint_url=endpoint, part_size_mb=5))


BLOCK = os.urandom(1 << 20)


def _chunks(total: int, size: int = 1 << 20):
    block = BLOCK[:size]
    for i in range(0, total, size):
        yield block[: min(size, total - i)]


def test_round_trip_list_head_delete(store):
    data = b"".join(_chunks(12 << 20))  # > 2 parts of 5 MB: a real multipart upload on S3
    put = store.put_stream("b1/dump.zst", _chunks(12 << 20))
    assert put.size == len(data) and put.sha256 == hashlib.sha256(data).hexdigest()
    assert b"".join(store.get_stream("b1/dump.zst")) == data
    store.put_bytes("b1/manifest.json", b"{}")
    assert [o.key for o in store.list()] == ["b1/dump.zst", "b1/manifest.json"]
    assert [o.key for o in store.list("b1/m")] == ["b1/manifest.json"]
    assert store.head("b1/dump.zst").size == len(data)
    assert store.head("b2/nothing") is None
    store.delete("b1/dump.zst")
    store.delete("b1/dump.zst")  # idempotent
    assert [o.key for o in store.list()] == ["b1/manifest.json"]
    with pytest.raises(StoreError, match="no object"):
        list(store.get_stream("b1/dump.zst"))


def test_failed_stream_leaves_nothing(store):
    def dying():
        yield from _chunks(11 << 20)
        raise RuntimeError("pg_dump died")

    with pytest.raises(RuntimeError, match="pg_dump died"):
        store.put_stream("b1/dump.zst", dying())
    assert store.list() == []
    if hasattr(store, "client"):
        uploads = store.client.list_multipart_uploads(Bucket=store.bucket)
        assert uploads.get("Uploads", []) == []  # the multipart upload was aborted
    else:
        assert list(store.root.rglob("*")) in ([], [store.root / "b1"])


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a/../../b", "a//b", ""])
def test_keys_cannot_escape_the_store(store, key):
    with pytest.raises(StoreError, match="invalid object key"):
        store.put_bytes(key, b"x")


def test_sse_kms_is_requested(moto_endpoint, bucket, kms_key):
    store = open_store("s3", S3StoreConfig(kind="s3", bucket=bucket, endpoint_url=moto_endpoint,
                                           sse_kms_key_id=kms_key, part_size_mb=5))
    store.put_stream("big", _chunks(6 << 20))
    store.put_bytes("small", b"x")
    for key in ("big", "small"):
        head = store.client.head_object(Bucket=bucket, Key=key)
        assert head["ServerSideEncryption"] == "aws:kms"
        assert kms_key in head["SSEKMSKeyId"]


def test_copy_between_stores_keeps_sha(tmp_path, moto_endpoint, bucket):
    local = open_store("local", LocalStoreConfig(path=tmp_path / "a"))
    s3 = open_store("dr", S3StoreConfig(kind="s3", bucket=bucket, endpoint_url=moto_endpoint))
    first = local.put_stream("x/dump", _chunks(3 << 20))
    copied = copy_object(local, s3, "x/dump")
    assert copied.sha256 == first.sha256 and copied.size == first.size


def test_s3_500s_are_retried_then_succeed(moto_endpoint, bucket):
    proxy = FaultProxy(moto_endpoint)
    try:
        store = open_store("s3", S3StoreConfig(kind="s3", bucket=bucket, endpoint_url=proxy.url,
                                               part_size_mb=5, max_attempts=5))
        proxy.fail_next = 3
        put = store.put_stream("k", _chunks(7 << 20))
        assert proxy.failures_sent == 3
        assert store.head("k").size == put.size == 7 << 20
    finally:
        proxy.close()


def test_s3_failing_for_good_gives_a_clear_message(moto_endpoint, bucket):
    proxy = FaultProxy(moto_endpoint)
    try:
        store = open_store("s3", S3StoreConfig(kind="s3", bucket=bucket, endpoint_url=proxy.url,
                                               max_attempts=2))
        proxy.fail_always = True
        with pytest.raises(TransientStoreError) as err:
            store.put_bytes("k", b"data")
        msg = str(err.value)
        assert f"store 's3' (s3://{bucket}/)" in msg and "InternalError" in msg and "2 attempts" in msg
        assert proxy.failures_sent >= 2
    finally:
        proxy.close()


def test_s3_connection_refused_then_back(moto_endpoint, bucket):
    """The endpoint refuses connections for a moment; botocore's backoff rides it out."""
    port = free_port()
    store = open_store("s3", S3StoreConfig(kind="s3", bucket=bucket, max_attempts=8,
                                           endpoint_url=f"http://127.0.0.1:{port}"))
    from http.server import ThreadingHTTPServer

    started = threading.Event()

    def come_back() -> None:
        time.sleep(1.0)
        proxy = FaultProxy(moto_endpoint)
        proxy.server.server_close()  # rebind the same handler on the port the store uses
        server = ThreadingHTTPServer(("127.0.0.1", port), proxy.server.RequestHandlerClass)
        started.set()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        holder.append(server)

    holder: list = []
    threading.Thread(target=come_back, daemon=True).start()
    try:
        store.put_bytes("k", b"after the outage")
        assert started.is_set()
        assert store.get_bytes("k") == b"after the outage"
    finally:
        for s in holder:
            s.shutdown()


def test_s3_unreachable_for_good(bucket):
    store = open_store("s3", S3StoreConfig(kind="s3", bucket=bucket, max_attempts=2, timeout_seconds=2,
                                           endpoint_url=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(TransientStoreError, match=r"store 's3'.*upload 'k' failed: EndpointConnectionError"):
        store.put_bytes("k", b"x")


def test_missing_bucket_is_permanent(moto_endpoint):
    store = open_store("s3", S3StoreConfig(kind="s3", bucket="no-such-bucket-here", endpoint_url=moto_endpoint))
    with pytest.raises(StoreError, match="NoSuchBucket") as err:
        store.put_bytes("k", b"x")
    assert not isinstance(err.value, TransientStoreError)


def test_local_store_check_reports_unwritable(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises((StoreError, OSError)):
        open_store("l", LocalStoreConfig(path=blocked / "sub")).check()
    open_store("l", LocalStoreConfig(path=tmp_path / "ok")).check()


def test_s3_check_names_the_bucket(moto_endpoint):
    with pytest.raises(StoreError, match="no-such-bucket-xyz"):
        open_store("s", S3StoreConfig(kind="s3", bucket="no-such-bucket-xyz",
                                      endpoint_url=moto_endpoint)).check()
    boto3  # the module is used by fixtures; keep the import explicit for readers


def test_parts_grow_to_fit_the_part_limit():
    from tasks.storage import MAX_PARTS, part_size

    mb = 1 << 20
    sizes = [part_size(16 * mb, n) for n in range(MAX_PARTS - 1)]
    assert sizes[0] == sizes[999] == 16 * mb and sizes[1000] == 32 * mb
    assert sum(sizes) > 800 * 10**9  # room for a dump of 800 GB at the default part size
    with pytest.raises(StoreError, match="more than 10000 parts"):
        part_size(16 * mb, MAX_PARTS - 1)
