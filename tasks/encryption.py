"""Client-side envelope encryption of backups: AES-256-GCM with a fresh data key per
backup, the data key wrapped by AWS KMS or by a local key file.

Format (self-contained, so a backup decrypts with only the key source):
    b"RBENC01\\n" | u32 header length | header JSON (key source, key id, wrapped key, nonce prefix)
    then frames: u32 ciphertext length | AES-GCM(plaintext block, nonce = prefix | u64 counter,
                 aad = sha256(header) | counter | last flag)
Each frame is authenticated before it is released, and the last-frame flag in the AAD
means a truncated or re-ordered stream fails to decrypt instead of restoring half.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.errors import ConfigError, IntegrityError, StoreError, TransientStoreError
from tasks.retries import is_transient

MAGIC = b"RBENC01\n"
BLOCK = 1 << 20  # plaintext bytes per frame
_FRAME = struct.Struct(">I")


class EncryptionConfig(BaseModel):
    """`[stores.<name>.encryption]`: where the key that wraps each data key lives."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["kms", "keyfile"]
    kms_key_id: str | None = Field(None, description="KMS key id or ARN (mode = kms)")
    kms_region: str = "us-east-1"
    kms_endpoint_url: str | None = None
    key_file: Path | None = Field(None, description="32-byte key, raw/hex/base64 (mode = keyfile)")

    @model_validator(mode="after")
    def _needs_key(self) -> "EncryptionConfig":
        if self.mode == "kms" and not self.kms_key_id:
            raise ValueError("mode 'kms' needs kms_key_id")
        if self.mode == "keyfile" and not self.key_file:
            raise ValueError("mode 'keyfile' needs key_file")
        return self


def _read_key_file(path: Path) -> bytes:
    try:
        raw = path.expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"encryption key_file {path}: {exc.strerror}") from None
    if len(raw) == 32:
        return raw
    text = raw.strip()
    try:
        key = bytes.fromhex(text.decode()) if len(text) == 64 else base64.b64decode(text, validate=True)
    except (ValueError, UnicodeDecodeError):
        key = b""
    if len(key) == 32:
        return key
    raise ConfigError(f"encryption key_file {path}: expected 32 bytes (raw, 64 hex chars or base64)")


def _kms(cfg: EncryptionConfig) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "kms", region_name=cfg.kms_region, endpoint_url=cfg.kms_endpoint_url,
        config=Config(retries={"max_attempts": 5, "mode": "standard"},
                      connect_timeout=10, read_timeout=30))


def _kms_error(message: str, exc: Exception) -> Exception:
    """Throttling and outages are retried; a wrong or disabled key is not."""
    return TransientStoreError(message) if is_transient(exc) else StoreError(message)


def _new_data_key(cfg: EncryptionConfig) -> tuple[bytes, dict[str, str]]:
    """A fresh 256-bit data key and the header fields that let it be unwrapped later."""
    if cfg.mode == "kms":
        try:
            r = _kms(cfg).generate_data_key(KeyId=cfg.kms_key_id, KeySpec="AES_256")
        except Exception as exc:  # noqa: BLE001 - boto errors carry no secrets
            raise _kms_error(f"KMS generate_data_key with key {cfg.kms_key_id}: {exc}", exc) from None
        return r["Plaintext"], {"source": "kms", "key_id": r.get("KeyId", cfg.kms_key_id or ""),
                                "wrapped": base64.b64encode(r["CiphertextBlob"]).decode()}
    master = _read_key_file(cfg.key_file)  # type: ignore[arg-type]
    data_key, nonce = AESGCM.generate_key(256), os.urandom(12)
    wrapped = nonce + AESGCM(master).encrypt(nonce, data_key, b"rb-data-key")
    return data_key, {"source": "keyfile", "key_id": key_fingerprint(master),
                      "wrapped": base64.b64encode(wrapped).decode()}


def key_fingerprint(master: bytes) -> str:
    """A public name for a local key: enough to tell keys apart, useless to an attacker."""
    return "file:" + hashlib.sha256(b"rb-key-id" + master).hexdigest()[:16]


def key_id(cfg: EncryptionConfig | None) -> str | None:
    """The id recorded in manifests for this configuration's key."""
    if cfg is None:
        return None
    if cfg.mode == "kms":
        return cfg.kms_key_id
    return key_fingerprint(_read_key_file(cfg.key_file))  # type: ignore[arg-type]


def _unwrap(cfg: EncryptionConfig | None, header: dict[str, str]) -> bytes:
    wrapped = base64.b64decode(header["wrapped"])
    if header["source"] == "kms":
        if cfg is None or cfg.mode != "kms":
            raise ConfigError(f"backup is encrypted with KMS key {header['key_id']}; "
                              "configure the store's encryption (mode = kms) to read it")
        try:
            return _kms(cfg).decrypt(CiphertextBlob=wrapped)["Plaintext"]
        except Exception as exc:  # noqa: BLE001
            raise _kms_error(f"KMS could not unwrap the data key ({header['key_id']}): {exc}", exc) from None
    if cfg is None or cfg.mode != "keyfile":
        raise ConfigError(f"backup is encrypted with local key {header['key_id']}; "
                          "configure the store's encryption key_file to read it")
    master = _read_key_file(cfg.key_file)  # type: ignore[arg-type]
    if key_fingerprint(master) != header["key_id"]:
        raise ConfigError(f"backup is encrypted with local key {header['key_id']}, "
                          f"but key_file is {key_fingerprint(master)}")
    try:
        return AESGCM(master).decrypt(wrapped[:12], wrapped[12:], b"rb-data-key")
    except InvalidTag:
        raise IntegrityError("the wrapped data key does not authenticate") from None


def _aad(header_digest: bytes, counter: int, last: bool) -> bytes:
    return header_digest + struct.pack(">QB", counter, 1 if last else 0)


def encrypt(cfg: EncryptionConfig, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Encrypt a stream; memory stays at about two blocks whatever its length."""
    data_key, fields = _new_data_key(cfg)
    prefix = os.urandom(4)
    header = json.dumps({**fields, "alg": "AES-256-GCM", "block": BLOCK,
                         "nonce_prefix": base64.b64encode(prefix).decode()}).encode()
    digest = hashlib.sha256(header).digest()
    aes = AESGCM(data_key)
    yield MAGIC + _FRAME.pack(len(header)) + header
    counter, pending = 0, bytearray()
    for chunk in chunks:
        pending += chunk
        while len(pending) > BLOCK:  # keep one block back: only the very last is "last"
            block = bytes(pending[:BLOCK])
            del pending[:BLOCK]
            sealed = aes.encrypt(prefix + struct.pack(">Q", counter), block, _aad(digest, counter, False))
            yield _FRAME.pack(len(sealed)) + sealed
            counter += 1
    sealed = aes.encrypt(prefix + struct.pack(">Q", counter), bytes(pending), _aad(digest, counter, True))
    yield _FRAME.pack(len(sealed)) + sealed


class _Reader:
    """Exact-size reads over a stream of arbitrary chunks."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = bytearray()

    def read(self, n: int) -> bytes | None:
        while len(self._buf) < n:
            nxt = next(self._it, None)
            if nxt is None:
                if self._buf:
                    raise IntegrityError("encrypted stream is truncated")
                return None
            self._buf += nxt
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def decrypt(cfg: EncryptionConfig | None, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Decrypt a stream made by `encrypt`, releasing each block only once authenticated."""
    r = _Reader(chunks)
    head = r.read(len(MAGIC) + _FRAME.size)
    if head is None or not head.startswith(MAGIC):
        raise IntegrityError("not an encrypted backup (bad header)")
    (hlen,) = _FRAME.unpack(head[len(MAGIC):])
    if hlen > 65536:
        raise IntegrityError("encrypted backup header is corrupt")
    raw_header = r.read(hlen)
    try:
        header = json.loads(raw_header or b"")
        prefix = base64.b64decode(header["nonce_prefix"])
    except (ValueError, KeyError):
        raise IntegrityError("encrypted backup header is corrupt") from None
    digest = hashlib.sha256(raw_header or b"").digest()
    aes = AESGCM(_unwrap(cfg, header))
    counter = 0
    while True:
        size = r.read(_FRAME.size)
        if size is None:
            raise IntegrityError("encrypted stream is truncated (no final block)")
        (n,) = _FRAME.unpack(size)
        if n > BLOCK + 16:
            raise IntegrityError(f"encrypted block {counter} is corrupt")
        sealed = r.read(n)
        if sealed is None:
            raise IntegrityError("encrypted stream is truncated")
        nonce = prefix + struct.pack(">Q", counter)
        for last in (False, True):
            try:
                plain = aes.decrypt(nonce, sealed, _aad(digest, counter, last))
                break
            except InvalidTag:
                continue
        else:
            raise IntegrityError(f"encrypted block {counter} does not authenticate (corrupt or tampered)")
        if plain:
            yield plain
        if last:
            if r.read(1) is not None:
                raise IntegrityError("data after the final encrypted block")
            return
        counter += 1
