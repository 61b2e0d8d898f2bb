"""Backup stores: a local directory or an S3 bucket, behind one small interface.

Writes are streamed and atomic: a local write goes to a hidden partial file that is
renamed into place only when complete; an S3 write is a multipart upload that is
completed only when every part arrived, and aborted on any failure. So a reader never
sees half an object. Every write returns the size and sha256 of what was stored.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from tasks.encryption import EncryptionConfig
from tasks.errors import ObjectNotFound, StoreError, TransientStoreError
from tasks.retries import is_transient

READ_CHUNK = 1 << 20


class _StoreBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replica: str | None = Field(None, description="name of another store that gets a copy of each backup")
    encryption: EncryptionConfig | None = Field(None, description="client-side AES-256-GCM")


class LocalStoreConfig(_StoreBase):
    """`[stores.<name>] kind = "local"`: a directory (a mounted volume, a NAS)."""

    kind: Literal["local"] = "local"
    path: Path


class S3StoreConfig(_StoreBase):
    """`[stores.<name>] kind = "s3"`: a bucket and prefix, optionally SSE-KMS."""

    kind: Literal["s3"]
    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = ""
    region: str = "us-east-1"
    endpoint_url: str | None = None
    sse_kms_key_id: str | None = Field(None, description="KMS key for server-side encryption")
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    part_size_mb: int = Field(16, ge=5, le=512)
    max_attempts: int = Field(5, ge=1, le=20, description="attempts per S3 call (backoff)")
    timeout_seconds: float = Field(30, gt=0)


StoreConfig = Annotated[Union[LocalStoreConfig, S3StoreConfig], Field(discriminator="kind")]


@dataclass
class ObjectInfo:
    key: str
    size: int
    modified: datetime


@dataclass
class PutResult:
    size: int
    sha256: str


def check_key(key: str) -> str:
    """Object keys are relative paths of safe segments; nothing can climb out of the store."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise StoreError(f"invalid object key {key!r}")
    return key


class Store(ABC):
    """What a backup store can do. Subclasses: LocalStore, S3Store."""

    name: str
    sse_kms_key_id: str | None = None  # the KMS key S3 encrypts objects with, if any

    @abstractmethod
    def describe(self) -> str:
        """Name and location, for messages (never credentials)."""

    @abstractmethod
    def put_stream(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        """Store `chunks` under `key` atomically; returns size and sha256 of what was stored."""

    @abstractmethod
    def get_stream(self, key: str) -> Iterator[bytes]:
        """The object's bytes in chunks; raises StoreError if it does not exist."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose key starts with `prefix`, sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; absent objects are not an error (idempotent)."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size and time of an object, or None if absent."""

    @abstractmethod
    def check(self) -> None:
        """Raise unless the store is reachable and writable enough to be used."""

    def put_bytes(self, key: str, data: bytes) -> PutResult:
        return self.put_stream(key, [data])

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.get_stream(key))


class LocalStore(Store):
    def __init__(self, name: str, config: LocalStoreConfig) -> None:
        self.name = name
        self.root = config.path.expanduser().resolve()

    def describe(self) -> str:
        return f"store '{self.name}' ({self.root})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
        digest, size = hashlib.sha256(), 0
        try:
            with open(partial, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, final)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return PutResult(size=size, sha256=digest.hexdigest())

    def get_stream(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(f"{self.describe()}: no object {key!r}")
        return self._read(path)

    @staticmethod
    def _read(path: Path) -> Iterator[bytes]:
        with open(path, "rb") as f:
            while data := f.read(READ_CHUNK):
                yield data

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for path in self.root.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    st = path.stat()
                    out.append(ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc)))
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        parent = path.parent
        while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        if not path.is_file():
            return None
        st = path.stat()
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc))

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / f".probe-{uuid.uuid4().hex[:8]}"
        try:
            probe.write_bytes(b"ok")
        except OSError as exc:
            raise StoreError(f"{self.describe()}: not writable: {exc.strerror}") from None
        finally:
            probe.unlink(missing_ok=True)


class S3Store(Store):
    def __init__(self, name: str, config: S3StoreConfig) -> None:
        import boto3
        from botocore.config import Config

        self.name = name
        self.config = config
        self.bucket = config.bucket
        self.sse_kms_key_id = config.sse_kms_key_id
        self.prefix = config.prefix.strip("/") + "/" if config.prefix.strip("/") else ""
        creds: dict[str, Any] = {}
        if config.access_key_id and config.secret_access_key:
            creds = {"aws_access_key_id": config.access_key_id.get_secret_value(),
                     "aws_secret_access_key": config.secret_access_key.get_secret_value()}
        self.client = boto3.session.Session().client(
            "s3", region_name=config.region, endpoint_url=config.endpoint_url,
            config=Config(retries={"max_attempts": config.max_attempts, "mode": "standard"},
                          connect_timeout=config.timeout_seconds, read_timeout=config.timeout_seconds,
                          s3={"addressing_style": "path"} if config.endpoint_url else None,
                          # Checksums on every request would cost a second hash pass;
                          # the manifest's sha256 covers integrity end to end.
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"),
            **creds,
        )

    def describe(self) -> str:
        return f"store '{self.name}' (s3://{self.bucket}/{self.prefix})"

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _fail(self, exc: Exception, action: str, key: str = "") -> Exception:
        """Translate a boto error into a message that says what to fix."""
        import botocore.exceptions as bx

        where = f"{self.describe()}: {action}" + (f" {key!r}" if key else "")
        if isinstance(exc, bx.ClientError):
            code = exc.response.get("Error", {}).get("Code", "?")
            msg = exc.response.get("Error", {}).get("Message", "")
            text = f"{where} failed: {code} {msg}".strip()
        else:
            text = f"{where} failed: {type(exc).__name__}: {exc}"
        if is_transient(exc):
            return TransientStoreError(f"{text} (after {self.config.max_attempts} attempts)")
        return StoreError(text)

    def _extra(self) -> dict[str, str]:
        if self.config.sse_kms_key_id:
            return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self.config.sse_kms_key_id}
        return {}

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> PutResult:
        """Multipart upload with parts uploaded in the background, at most two in flight."""
        full = self._key(key)
        digest, size = hashlib.sha256(), 0
        buf = bytearray()
        upload_id: str | None = None
        parts: list[Future[dict[str, Any]]] = []
        slots = threading.Semaphore(2)
        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="s3-part")

        def send(number: int, body: bytes) -> dict[str, Any]:
            try:
                r = self.client.upload_part(Bucket=self.bucket, Key=full, UploadId=upload_id,
                                            PartNumber=number, Body=body)
                return {"PartNumber": number, "ETag": r["ETag"]}
            finally:
                slots.release()

        def flush_part() -> None:
            nonlocal upload_id
            if upload_id is None:
                upload_id = self.client.create_multipart_upload(
                    Bucket=self.bucket, Key=full, **self._extra())["UploadId"]
            for f in parts:
                if f.done() and f.exception():
                    raise f.exception()  # type: ignore[misc]
            slots.acquire()
            parts.append(pool.submit(send, len(parts) + 1, bytes(buf)))
            buf.clear()

        try:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                buf += chunk
                if len(buf) >= part_size(self.config.part_size_mb << 20, len(parts)):
                    flush_part()
            if upload_id is None:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=bytes(buf), **self._extra())
            else:
                if buf:
                    flush_part()
                done = [f.result() for f in parts]
                self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": done})
        except BaseException as exc:
            pool.shutdown(wait=True, cancel_futures=True)
            if upload_id is not None:
                self._abort(full, upload_id)
            if isinstance(exc, Exception) and _is_boto(exc):
                raise self._fail(exc, "upload", key) from None
            raise
        pool.shutdown(wait=True)
        return PutResult(size=size, sha256=digest.hexdigest())

    def _abort(self, full: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except Exception:  # noqa: BLE001 - the original failure matters more
            pass  # a bucket lifecycle rule for incomplete uploads cleans what this could not

    def get_stream(self, key: str) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except Exception as exc:
            if _is_boto(exc) and _code(exc) in ("NoSuchKey", "404"):
                raise ObjectNotFound(f"{self.describe()}: no object {key!r}") from None
            raise self._fail(exc, "download", key) from None
        return self._iter(body, key)

    def _iter(self, body: Any, key: str) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(READ_CHUNK)
        except Exception as exc:
            if _is_boto(exc):
                raise self._fail(exc, "download", key) from None
            raise
        finally:
            body.close()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        out = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix)
            for page in pages:
                for o in page.get("Contents", []):
                    out.append(ObjectInfo(o["Key"][len(self.prefix):], o["Size"], o["LastModified"]))
        except Exception as exc:
            raise self._fail(exc, "list") from None
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise self._fail(exc, "delete", key) from None

    def head(self, key: str) -> ObjectInfo | None:
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            if _is_boto(exc) and _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail(exc, "head", key) from None
        return ObjectInfo(key, r["ContentLength"], r["LastModified"])

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise self._fail(exc, "head bucket") from None


MAX_PARTS = 10_000  # S3's limit per multipart upload


def part_size(base: int, parts_so_far: int) -> int:
    """Parts grow by `base` every 1,000 parts, so an object of unknown size fits S3's
    10,000-part limit: about 880 GB with 16 MB parts (memory grows only for huge dumps)."""
    if parts_so_far >= MAX_PARTS - 1:
        raise StoreError(f"object needs more than {MAX_PARTS} parts; raise part_size_mb")
    return base * (1 + parts_so_far // 1000)


def _is_boto(exc: BaseException) -> bool:
    return type(exc).__module__.startswith(("botocore", "boto3", "urllib3"))


def _code(exc: BaseException) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def open_store(name: str, config: LocalStoreConfig | S3StoreConfig) -> Store:
    """The store for a config section."""
    if isinstance(config, S3StoreConfig):
        return S3Store(name, config)
    return LocalStore(name, config)


def copy_object(source: Store, target: Store, key: str) -> PutResult:
    """Stream one object from one store to another; the result carries the target's sha256."""
    return target.put_stream(key, source.get_stream(key))
