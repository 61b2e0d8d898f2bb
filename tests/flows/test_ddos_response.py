"""Scenario 4 through Prefect: a flood from one key crowds out a tier's customers; the
runbook tells them apart from the audit log and proposes limits, applied only once
approved."""

from __future__ import annotations

import pytest
import redis

from flows.ddos_response import ddos_response
from tasks.approval import NotApproved
from tests.flows.test_rate_limit_adjustment import fresh_minute, tier_key
from tests.security_stack import artifact, call, new_key, usual_use
from tests.shared_redis import REDIS_URL


@pytest.fixture
def flood(security_stack):
    url, dsn = security_stack["url"], security_stack["dsn"]
    customers = [new_key(dsn, tier="standard") for _ in range(2)]
    for key_id, _ in customers:
        usual_use(dsn, key_id)  # they used these addresses yesterday
    flood_id, flood_key = new_key(dsn, tier="standard")
    fresh_minute()
    for _, plaintext in customers:
        assert [call(url, plaintext) for _ in range(8)] == [200] * 5 + [429] * 3  # real work refused
    for i in range(60):
        call(url, flood_key, ip=f"203.0.113.{i % 50}")
    return {**security_stack, "flood": (flood_id, flood_key), "customers": customers}


def test_a_flood_gets_a_lower_limit_and_the_crowded_tier_a_higher_one_once_approved(flood):
    ns, (flood_id, flood_key) = flood["ns"], flood["flood"]
    cache = redis.Redis.from_url(REDIS_URL)

    plan = ddos_response(dry_run=True)
    assert not plan.applied and plan.limited_share == pytest.approx(61 / 76)
    proposed = {(p.scope.kind, p.scope.name): (p.old, p.new) for p in plan.proposals}
    assert proposed == {("key", str(flood_id)): (5, 1), ("tier", "standard"): (5, 6)}
    assert list(cache.scan_iter(f"{ns}rate_limit*")) == []
    table = artifact("ddos-proposal")
    assert f"| key {flood_id} | {flood_key[:16]} | 5 | 1 |" in table and "| tier standard |  | 5 | 6 |" in table

    with pytest.raises(NotApproved):
        ddos_response(approval_timeout_minutes=0.05)
    assert list(cache.scan_iter(f"{ns}rate_limit*")) == []  # nothing without a person

    applied = ddos_response(auto_approve=True, duration_minutes=30, incident="INC-2026-12-06-9")
    assert applied.applied
    assert int(cache.get(f"{ns}rate_limit:key:{flood_id}:requests_per_minute")) == 1
    assert int(cache.get(tier_key(ns))) == 6 and 1790 <= cache.ttl(tier_key(ns)) <= 1800
    record = cache.hgetall(f"{ns}rate_limit_override:key:{flood_id}")
    assert record[b"by"] == b"ddos-response" and b"INC-2026-12-06-9" in record[b"reason"]


def test_quiet_traffic_proposes_nothing(security_stack):
    _, plaintext = new_key(security_stack["dsn"], tier="standard")
    call(security_stack["url"], plaintext)
    result = ddos_response(auto_approve=True)
    assert result.proposals == [] and not result.applied
