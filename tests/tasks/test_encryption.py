"""Envelope encryption: round trips with a key file and with KMS (moto), and tampering."""

from __future__ import annotations

import base64
import os

import pytest

from tasks import encryption
from tasks.encryption import EncryptionConfig
from tasks.errors import ConfigError, IntegrityError

PLAIN = os.urandom(3 * encryption.BLOCK + 12345)


def _split(data: bytes, size: int = 70000):
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.fixture
def keyfile_cfg(tmp_path):
    path = tmp_path / "backup.key"
    path.write_text(os.urandom(32).hex())
    return EncryptionConfig(mode="keyfile", key_file=path)


@pytest.fixture
def kms_cfg(moto_endpoint, kms_key):
    return EncryptionConfig(mode="kms", kms_key_id=kms_key, kms_endpoint_url=moto_endpoint)


@pytest.mark.parametrize("cfg_name", ["keyfile_cfg", "kms_cfg"])
def test_round_trip(request, cfg_name):
    cfg = request.getfixturevalue(cfg_name)
    sealed = b"".join(encryption.encrypt(cfg, _split(PLAIN)))
    assert sealed.startswith(encryption.MAGIC) and PLAIN[:64] not in sealed
    assert b"".join(encryption.decrypt(cfg, _split(sealed, 33333))) == PLAIN


def test_empty_stream_round_trips(keyfile_cfg):
    sealed = list(encryption.encrypt(keyfile_cfg, []))
    assert b"".join(encryption.decrypt(keyfile_cfg, sealed)) == b""


def test_a_flipped_byte_is_caught(keyfile_cfg):
    sealed = bytearray(b"".join(encryption.encrypt(keyfile_cfg, _split(PLAIN))))
    sealed[len(sealed) // 2] ^= 0x01
    with pytest.raises(IntegrityError, match="does not authenticate"):
        b"".join(encryption.decrypt(keyfile_cfg, [bytes(sealed)]))


def test_truncation_at_a_frame_boundary_is_caught(keyfile_cfg):
    frames = list(encryption.encrypt(keyfile_cfg, _split(PLAIN)))
    with pytest.raises(IntegrityError, match="truncated"):
        b"".join(encryption.decrypt(keyfile_cfg, frames[:-1]))


def test_wrong_key_file_is_named(keyfile_cfg, tmp_path):
    sealed = b"".join(encryption.encrypt(keyfile_cfg, [b"data"]))
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    with pytest.raises(ConfigError, match="encrypted with local key file:"):
        b"".join(encryption.decrypt(EncryptionConfig(mode="keyfile", key_file=other), [sealed]))
    with pytest.raises(ConfigError, match="configure the store's encryption"):
        b"".join(encryption.decrypt(None, [sealed]))


@pytest.mark.parametrize("content", [os.urandom(32), base64.b64encode(os.urandom(32)) + b"\n"], ids=["raw", "base64"])
def test_key_file_formats(tmp_path, content):
    path = tmp_path / "k"
    path.write_bytes(content)
    cfg = EncryptionConfig(mode="keyfile", key_file=path)
    assert b"".join(encryption.decrypt(cfg, encryption.encrypt(cfg, [b"abc"]))) == b"abc"


def test_bad_key_file_says_what_is_expected(tmp_path):
    path = tmp_path / "k"
    path.write_text("too short")
    with pytest.raises(ConfigError, match="expected 32 bytes"):
        list(encryption.encrypt(EncryptionConfig(mode="keyfile", key_file=path), [b"x"]))


def test_config_needs_its_key():
    with pytest.raises(ValueError, match="needs kms_key_id"):
        EncryptionConfig(mode="kms")
