"""Runbook 3 through Prefect, on the demo service (process controller) with the sample
database and the Redis here: the key is refused by the live service, its cached lookup
is gone, the replacement works, and its plaintext is nowhere but the delivery file."""

from __future__ import annotations

import hashlib
import json
import re
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
import redis

from flows.api_key_revocation import api_key_revocation
from tasks import api_keys
from tasks.approval import NotApproved
from tasks.config import load_settings
from tasks.security import SecurityError
from tests.conftest import free_port
from tests.security_stack import (artifact, artifacts, attack, call, logs_text, new_key, prefect_database_bytes,
                                  usual_use)
from tests.shared_redis import REDIS_URL


def test_a_compromised_key_is_revoked_refused_everywhere_and_replaced(security_stack):
    url, dsn, ns = security_stack["url"], security_stack["dsn"], security_stack["ns"]
    key_id, plaintext = new_key(dsn)
    usual_use(dsn, key_id)
    attack(url, plaintext)  # PII it never read, from a new address, far above its usual rate
    cache = redis.Redis.from_url(REDIS_URL)
    key_hash = hashlib.sha256(plaintext.encode()).hexdigest()
    assert cache.exists(f"{ns}apikey:{key_hash}")  # the service caches the lookup

    result = api_key_revocation(plaintext[:16], reason="leaked in a public repository")

    assert result.revoked and result.key_id == key_id and result.cache_dropped
    assert call(url, plaintext) == 401 and call(url, plaintext, "/api/profile") == 401  # the live service
    assert not cache.exists(f"{ns}apikey:{key_hash}")
    assert 0 < result.seconds_to_401 < 30
    with psycopg.connect(dsn) as conn:
        revoked_at, reason, replaced_by = conn.execute(
            "SELECT revoked_at, revoke_reason, replaced_by FROM api_keys WHERE id = %s", (key_id,)).fetchone()
        assert revoked_at and reason == "leaked in a public repository" and replaced_by == result.replacement_id
        owner, tier, permissions, new_hash = conn.execute(
            "SELECT user_id, tier, permissions, key_hash FROM api_keys WHERE id = %s",
            (result.replacement_id,)).fetchone()
    assert (owner, tier, permissions) == (7, "premium", ["orders:read", "profile:read"])

    delivery = Path(result.delivery_file)
    assert stat.S_IMODE(delivery.stat().st_mode) == 0o600
    assert stat.S_IMODE(delivery.parent.stat().st_mode) == 0o700
    replacement = api_keys.claim(delivery, delivery.parent)
    assert not delivery.exists()  # read once
    assert hashlib.sha256(replacement.encode()).hexdigest() == new_hash  # only the hash is stored
    assert call(url, replacement) == 200  # the new key works

    evidence = artifact(f"api-key-evidence-{key_id}")
    assert "users.email (PII)" in evidence and "ip 203.0.113.66" in evidence
    notice = artifact(f"api-key-notice-{key_id}")
    for text in ("SECURITY ticket: API Key Compromise", "ACTION REQUIRED: Your API Key was Compromised",
                 "Did they access PII?", "Yes: users.email, users.name", "leaked in a public repository"):
        assert text in notice, text
    report = artifact(f"api-key-revocation-key-{key_id}-{plaintext[:16].replace('_', '-')}")
    assert "policy met: new_pii_fields and rate_spike" in report and "| Time to 401 from the start |" in report

    # The plaintext of the replacement is nowhere else: logs, artifacts, notifications,
    # the Prefect database; nor is the compromised key's.
    posted = json.dumps(security_stack["slack"].requests)
    assert "revoked" in posted  # the notification went out
    for secret in (replacement, plaintext):
        assert secret not in logs_text() and secret not in json.dumps(artifacts()) and secret not in posted
        assert secret.encode() not in prefect_database_bytes()


def test_without_the_policy_a_person_must_approve_and_nothing_changes_unanswered(security_stack):
    url, dsn = security_stack["url"], security_stack["dsn"]
    key_id, plaintext = new_key(dsn)
    call(url, plaintext)  # one ordinary request: no sign of compromise
    with pytest.raises(NotApproved, match="nobody approved"):
        api_key_revocation(str(key_id), approval_timeout_minutes=0.05)
    assert call(url, plaintext) == 200
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT revoked_at, replaced_by FROM api_keys WHERE id = %s",
                            (key_id,)).fetchone() == (None, None)


def test_dry_run_and_an_already_revoked_key(security_stack):
    url, dsn = security_stack["url"], security_stack["dsn"]
    key_id, plaintext = new_key(dsn)
    plan = api_key_revocation(str(key_id), dry_run=True, auto_approve=True)
    assert plan.dry_run and not plan.revoked and call(url, plaintext) == 200
    first = api_key_revocation(str(key_id), auto_approve=True, replace=False)
    assert first.revoked and first.replacement_id is None
    again = api_key_revocation(str(key_id))  # no approval needed: nothing left to revoke
    assert not again.revoked and again.revoked_at == first.revoked_at and again.seconds_to_401 is not None
    report = artifact(f"api-key-revocation-key-{key_id}-{plaintext[:16].replace('_', '-')}")
    assert "already revoked at" in report and "**Outcome:** already revoked" in report


def test_a_replacement_is_issued_once(security_stack):
    dsn = security_stack["dsn"]
    key_id, _ = new_key(dsn)
    first = api_key_revocation(str(key_id), auto_approve=True)
    again = api_key_revocation(str(key_id), auto_approve=True)
    assert first.replacement_id and again.replacement_id is None
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM api_keys WHERE user_id = 7 AND key_prefix LIKE 'fq_live_%%' "
                            "AND created_at > now() - interval '1 minute' AND id <> %s",
                            (key_id,)).fetchone()[0] == 1


@pytest.mark.parametrize("ref, message", [
    ("999999999", "no API key has the id or prefix '999999999'"),
    ("fq_live_%", "no API key has the id or prefix 'fq_live_%'"),
    ("x'; DROP TABLE api_keys; --", "no API key has the id or prefix"),
    ("fq_", "matches several keys"),
    ("", "give a key id"),
], ids=["unknown-id", "percent", "sql-text", "ambiguous-prefix", "empty"])
def test_bad_key_references_change_nothing(security_stack, ref, message):
    dsn = security_stack["dsn"]
    with psycopg.connect(dsn) as conn:
        before = conn.execute("SELECT count(*), count(revoked_at) FROM api_keys").fetchone()
    with pytest.raises(SecurityError, match=re.escape(message)):
        api_key_revocation(ref, auto_approve=True)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*), count(revoked_at) FROM api_keys").fetchone() == before


def test_an_ambiguous_prefix_lists_the_keys(security_stack):
    dsn = security_stack["dsn"]
    a, _ = new_key(dsn)
    b, _ = new_key(dsn)
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE api_keys SET key_prefix = 'fq_live_dupe' || id WHERE id IN (%s, %s)", (a, b))
    with pytest.raises(SecurityError) as err:
        api_key_revocation("fq_live_dupe", auto_approve=True)
    assert f"key {a} (fq_live_dupe{a}…" in str(err.value) and f"key {b} (" in str(err.value)


def test_redis_down_the_revocation_holds_and_the_cache_step_is_reported(security_stack, write_config):
    url, dsn = security_stack["url"], security_stack["dsn"]
    key_id, plaintext = new_key(dsn)
    dead = f"redis://127.0.0.1:{free_port()}/0"
    write_config(security_stack["text"].replace(f'redis_url = "{REDIS_URL}"', f'redis_url = "{dead}"'))
    cache = redis.Redis.from_url(REDIS_URL)
    cache.delete(f"{security_stack['ns']}apikey:{hashlib.sha256(plaintext.encode()).hexdigest()}")  # nothing stale

    result = api_key_revocation(str(key_id), auto_approve=True, replace=False)

    assert result.revoked and result.cache_dropped is None
    assert call(url, plaintext) == 401
    report = artifact(f"api-key-revocation-key-{key_id}-{plaintext[:16].replace('_', '-')}")
    assert "| drop the cached key |" in report and "| failed |" in report
    assert "the service may accept a cached lookup of the key until it expires" in report


def test_the_service_unreachable_fails_clearly_with_the_key_still_revoked(security_stack):
    dsn = security_stack["dsn"]
    key_id, _ = new_key(dsn)
    security_stack["ctl"].stop()
    with pytest.raises(api_keys.StillAccepted, match=r"unreachable .* after 3s and \d+ tries \(expected 401\)"):
        api_key_revocation(str(key_id), auto_approve=True, replace=False)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT revoked_at IS NOT NULL FROM api_keys WHERE id = %s", (key_id,)).fetchone()[0]


def test_evidence_flags_new_pii_new_addresses_and_a_spike(security_stack):
    url, dsn = security_stack["url"], security_stack["dsn"]
    key_id, plaintext = new_key(dsn)
    usual_use(dsn, key_id, hours_ago=5, count=60)
    for _ in range(3):
        call(url, plaintext)  # its usual operation, its usual address: nothing new
    cfg = load_settings().security
    with psycopg.connect(dsn) as conn:
        quiet = api_keys.gather_evidence(conn, cfg, api_keys.find(conn, cfg, str(key_id)))
    assert quiet.requests == 63 and quiet.rows_returned >= 600 and not quiet.rate_spike
    assert quiet.pii_fields == [] and quiet.new_source_ips == [] and quiet.signs() == {
        "new_pii_fields": False, "pii_fields": False, "rate_spike": False, "new_source_ips": False}
    attack(url, plaintext)
    with psycopg.connect(dsn) as conn:
        loud = api_keys.gather_evidence(conn, cfg, api_keys.find(conn, cfg, str(key_id)))
    assert loud.new_pii_fields == ["users.email", "users.name"] and loud.new_source_ips == ["203.0.113.66"]
    assert loud.rate_spike and loud.recent_requests == 28 and loud.first_use < datetime.now(timezone.utc) - timedelta(hours=4)
    assert api_keys.policy_met(cfg, loud) == (True, "policy met: new_pii_fields and rate_spike")
    assert api_keys.policy_met(cfg, quiet)[1] == "policy not met: no new_pii_fields, rate_spike in the evidence"


def test_a_replacement_inherits_its_predecessors_history(security_stack):
    """The replacement's first reads of the owner's profile are what the old key did
    every day: not new, not a spike, so the policy does not revoke it."""
    url, dsn = security_stack["url"], security_stack["dsn"]
    key_id, plaintext = new_key(dsn)
    usual_use(dsn, key_id)
    for _ in range(3):
        call(url, plaintext, "/api/profile")  # its owner reads the profile too
    result = api_key_revocation(str(key_id), auto_approve=True)
    replacement = api_keys.claim(Path(result.delivery_file), Path(result.delivery_file).parent)
    for _ in range(3):
        assert call(url, replacement, "/api/profile") == 200
    cfg = load_settings().security
    with psycopg.connect(dsn) as conn:
        evidence = api_keys.gather_evidence(conn, cfg, api_keys.find(conn, cfg, str(result.replacement_id)))
    assert evidence.requests == 3 and evidence.new_pii_fields == [] and not evidence.rate_spike
    assert api_keys.policy_met(cfg, evidence)[0] is False


def test_a_whole_leaked_key_is_found_by_its_hash_and_never_shown(security_stack):
    url, dsn = security_stack["url"], security_stack["dsn"]
    key_id, plaintext = new_key(dsn)
    result = api_key_revocation(plaintext, auto_approve=True, replace=False)
    assert result.key_id == key_id and call(url, plaintext) == 401
    assert plaintext not in json.dumps(artifacts()) and plaintext not in logs_text()
    with pytest.raises(SecurityError, match=r"no API key matches the key given \(fq_live_[0-9a-f]{8}…\)"):
        api_key_revocation("fq_live_" + "0" * 64, auto_approve=True)
