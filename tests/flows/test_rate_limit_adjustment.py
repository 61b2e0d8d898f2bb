"""Runbook 4 through Prefect, on the demo service with its limits file and the Redis
here: an override lets blocked traffic through, expires on its own or is reverted,
restores what it replaced, and is undone early when errors rise."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import redis

from flows.rate_limit_adjustment import RevertedEarly, rate_limit_adjustment, rate_limit_revert
from tasks.config import load_settings
from tasks.errors import ConfigError
from tasks.security import SecurityError
from tests.security_stack import artifact, call, new_key
from tests.shared_redis import REDIS_URL


def tier_key(ns: str, tier: str = "standard") -> str:
    return f"{ns}rate_limit:tier:{tier}:requests_per_minute"


def fresh_minute() -> None:
    """Start at the top of a minute's first half, so a test's requests share one window."""
    if time.time() % 60 > 40:
        time.sleep(60 - time.time() % 60 + 0.2)


def test_raising_a_tier_limit_lets_its_traffic_through_until_reverted(security_stack):
    url, dsn, ns = security_stack["url"], security_stack["dsn"], security_stack["ns"]
    cache = redis.Redis.from_url(REDIS_URL)
    key_id, plaintext = new_key(dsn, tier="standard")
    fresh_minute()
    assert [call(url, plaintext) for _ in range(7)] == [200] * 5 + [429] * 2  # the file's limit: 5/min

    result = rate_limit_adjustment("tier", 20, target="standard", duration_minutes=10, watch_seconds=1,
                                   reason="nightly export of customer 42", requested_by="alice")

    assert (result.old, result.new, result.scope) == (5, 20, "tier standard")
    assert result.limited_before == pytest.approx(2 / 7)
    assert int(cache.get(tier_key(ns))) == 20 and 590 <= cache.ttl(tier_key(ns)) <= 600
    assert call(url, plaintext) == 200  # 8th request this minute, under the new limit
    decision = artifact("rate-limit-decision-tier-standard")
    for text in ("**Who:** alice", "**Why:** nightly export of customer 42", "**Old value:** 5/min (the default",
                 "**New value:** 20/min", "**Until:** 20"):
        assert text in decision, text
    consumers = artifact("rate-limit-consumers")
    assert plaintext[:16] in consumers and '"limited": 2' in consumers

    reverted = rate_limit_revert("tier", target="standard", reason="export done", requested_by="bob")
    assert (reverted.old, reverted.new) == (20, 5)
    assert cache.get(tier_key(ns)) is None and not cache.exists(f"{ns}rate_limit_override:tier:standard")
    assert call(url, plaintext) == 429
    again = rate_limit_revert("tier", target="standard")
    assert (again.old, again.new) == (5, 5)
    assert "**Outcome:** already reverted" in artifact("rate-limit-revert-tier-standard")


def test_a_revert_restores_the_override_it_replaced(security_stack):
    ns = security_stack["ns"]
    cache = redis.Redis.from_url(REDIS_URL)
    cache.set(tier_key(ns), 8, ex=300)  # someone's earlier override, 5 min left
    rate_limit_adjustment("tier", 30, target="standard", watch_seconds=0)
    assert int(cache.get(tier_key(ns))) == 30
    rate_limit_revert("tier", target="standard")
    assert int(cache.get(tier_key(ns))) == 8 and 290 <= cache.ttl(tier_key(ns)) <= 300


def test_a_key_override_wins_over_its_tier(security_stack):
    url, dsn, ns = security_stack["url"], security_stack["dsn"], security_stack["ns"]
    cache = redis.Redis.from_url(REDIS_URL)
    key_id, plaintext = new_key(dsn, tier="standard")
    other_id, other = new_key(dsn, tier="standard")
    result = rate_limit_adjustment("key", 2, target=plaintext[:16], watch_seconds=0, reason="slow it down")
    assert result.scope == f"key {key_id}" and int(cache.get(f"{ns}rate_limit:key:{key_id}:requests_per_minute")) == 2
    fresh_minute()
    assert [call(url, plaintext) for _ in range(3)] == [200, 200, 429]
    assert [call(url, other) for _ in range(3)] == [200, 200, 200]  # its tier's 5/min


def test_a_permanent_change_is_a_diff_and_changes_nothing(security_stack):
    ns, limits = security_stack["ns"], security_stack["limits"]
    before = limits.read_text()
    result = rate_limit_adjustment("tier", 8, target="standard", permanent=True, reason="it keeps happening")
    assert result.permanent and result.until is None
    assert "-standard = 5\n+standard = 8" in result.diff and f"a/{limits}" in result.diff
    assert limits.read_text() == before and redis.Redis.from_url(REDIS_URL).get(tier_key(ns)) is None
    decision = artifact("rate-limit-decision-tier-standard")
    assert "```diff" in decision and "+standard = 8" in decision and "permanent, once the diff" in decision


@pytest.mark.parametrize("kwargs, message", [
    ({"scope": "tier", "target": "standard", "limit": 51}, "51/min is outside 0.5-50/min (10x the tier standard "
                                                           "default of 5/min); pass force"),
    ({"scope": "tier", "target": "standard", "limit": 0}, "at least 1 request per minute"),
    ({"scope": "tier", "target": "standard", "limit": 6, "duration_minutes": 0}, "the duration must be positive"),
    ({"scope": "tier", "target": "standard", "limit": 6, "duration_minutes": -5}, "the duration must be positive"),
    ({"scope": "tier", "target": "standard'; DEL *", "limit": 6}, "a tier name is lowercase"),
    ({"scope": "key", "target": "fq_nomatch_%", "limit": 6}, "no API key has the id or prefix"),
    ({"scope": "key", "limit": 6}, "needs the key's id or prefix"),
    ({"scope": "global", "target": "standard", "limit": 6}, "a global limit takes no target"),
], ids=["above-bounds", "zero-limit", "zero-duration", "negative-duration", "bad-tier", "unknown-key",
        "key-without-target", "global-with-target"])
def test_bad_requests_change_nothing(security_stack, kwargs, message):
    cache = redis.Redis.from_url(REDIS_URL)
    with pytest.raises(SecurityError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        rate_limit_adjustment(**kwargs)
    assert list(cache.scan_iter(f"{security_stack['ns']}rate_limit*")) == []


def test_force_allows_a_limit_beyond_the_bounds(security_stack):
    result = rate_limit_adjustment("tier", 500, target="standard", force=True, watch_seconds=0, duration_minutes=1)
    assert result.new == 500
    assert int(redis.Redis.from_url(REDIS_URL).ttl(tier_key(security_stack["ns"]))) <= 60


def test_redis_unreachable_is_a_clear_error(security_stack, write_config):
    write_config(security_stack["text"].replace(f'redis_url = "{REDIS_URL}"', 'redis_url = "redis://127.0.0.1:1/0"'))
    with pytest.raises(SecurityError, match="the service's Redis cannot be reached"):
        rate_limit_adjustment("tier", 6, target="standard")


def test_errors_rising_under_the_new_limit_revert_it_early(security_stack, write_config, prometheus):
    url, dsn, ns = security_stack["url"], security_stack["dsn"], security_stack["ns"]
    prom = prometheus({"api": f"127.0.0.1:{security_stack['port']}"})
    write_config(security_stack["text"] + f'\n[prometheus]\nurl = "{prom}"\n')
    assert load_settings().prometheus is not None
    cache = redis.Redis.from_url(REDIS_URL)
    _, plaintext = new_key(dsn, tier="standard")
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            call(url, plaintext)
            time.sleep(0.1)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        time.sleep(3)  # a rate to read
        # The new limit "brings" a bug out: the API starts failing while it is watched.
        httpx.post(f"{url}/admin/fault", json={"mode": "api-error"}, timeout=5)
        with pytest.raises(RevertedEarly, match="the error rate rose to"):
            rate_limit_adjustment("tier", 40, target="standard", watch_seconds=60)
    finally:
        stop.set()
        worker.join(timeout=10)
        httpx.post(f"{url}/admin/fault", json={"mode": "none"}, timeout=5)
    assert cache.get(tier_key(ns)) is None  # back to the default
    report = artifact("rate-limit-adjustment-tier-standard")
    assert "| Reverted | reverted to the default: the error rate rose to" in report
    assert any("reverted" in m.get("text", "") for m in security_stack["slack"].calls("chat.postMessage"))


def test_without_a_security_section_the_runbook_says_what_to_configure(sample_db, tmp_path, write_config):
    write_config(f'[databases.orders]\ndsn = "{sample_db}"\n[stores.local]\nkind = "local"\npath = "{tmp_path}"\n')
    with pytest.raises(ConfigError, match=r"no \[security\] section"):
        rate_limit_adjustment("global", 100)
