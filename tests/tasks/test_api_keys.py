"""tasks.api_keys on the sample database: literal lookups, and a replacement that is
either wholly issued (key row and delivery file) or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest

from tasks import api_keys
from tasks.postgres import Database, DatabaseConfig
from tasks.security import SecurityConfig, SecurityError
from tests.security_stack import new_key


def _db(dsn: str) -> Database:
    return Database("orders", DatabaseConfig(dsn=dsn, store="local"))


def _count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM api_keys").fetchone()[0]


def test_a_prefix_is_matched_literally(sample_db):
    key_id, plaintext = new_key(sample_db)
    cfg = SecurityConfig()
    with psycopg.connect(sample_db) as conn:
        assert api_keys.find(conn, cfg, plaintext[:16]).id == key_id
        assert api_keys.find(conn, cfg, str(key_id)).key_prefix == plaintext[:16]
        for text in ("fq_live%", "fq\\_live", "' OR '1'='1"):
            with pytest.raises(SecurityError, match="no API key has the id or prefix"):
                api_keys.find(conn, cfg, text)
        with pytest.raises(SecurityError, match="printable"):
            api_keys.find(conn, cfg, "fq_live\n1")


def test_a_replacement_that_cannot_be_delivered_is_not_issued(sample_db, tmp_path):
    key_id, _ = new_key(sample_db)
    cfg = SecurityConfig(delivery_dir=tmp_path / "keys")
    with psycopg.connect(sample_db) as conn:
        old = api_keys.find(conn, cfg, str(key_id))
    before = _count(sample_db)
    (tmp_path / "keys").mkdir(mode=0o500)  # read-only: the file cannot be created
    if os.geteuid() == 0:  # root writes anyway: make the path a file instead
        (tmp_path / "keys").rmdir()
        (tmp_path / "keys").write_text("")
    with pytest.raises((SecurityError, OSError)):
        api_keys.issue_replacement(_db(sample_db), cfg, old)
    assert _count(sample_db) == before  # no key that nobody could use
    with psycopg.connect(sample_db) as conn:
        assert conn.execute("SELECT replaced_by FROM api_keys WHERE id = %s", (key_id,)).fetchone()[0] is None


def test_a_failed_commit_leaves_no_delivery_file(sample_db, tmp_path):
    key_id, _ = new_key(sample_db)
    cfg = SecurityConfig(delivery_dir=tmp_path / "keys", keys_table="api_keys")
    with psycopg.connect(sample_db) as conn:
        old = api_keys.find(conn, cfg, str(key_id))
        # A deferred trigger that fails only at COMMIT: the insert and the file are done by then.
        conn.execute("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                     "RAISE EXCEPTION 'refused at commit'; END $$")
        conn.execute("CREATE CONSTRAINT TRIGGER refuse_replacements AFTER UPDATE ON api_keys "
                     "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.replaced_by IS NOT NULL) "
                     "EXECUTE FUNCTION refuse()")
    before = _count(sample_db)
    with pytest.raises(psycopg.Error, match="refused at commit"):
        api_keys.issue_replacement(_db(sample_db), cfg, old)
    assert _count(sample_db) == before
    assert list(Path(tmp_path / "keys").iterdir()) == []
