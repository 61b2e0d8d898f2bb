"""tasks.rate_limits against the Redis here: an override and its record live and die
together, a restore puts back exactly what was replaced; the permanent diff edits the
limits file in place."""

from __future__ import annotations


import pytest

from tasks import rate_limits
from tasks.rate_limits import Scope
from tasks.security import RateLimitsConfig, SecurityConfig, SecurityError
from tests.shared_redis import REDIS_URL, redis_namespace

@pytest.fixture
def cfg():
    with redis_namespace() as (_, prefix):
        yield SecurityConfig(redis_url=REDIS_URL, redis_prefix=prefix,
                             rate_limits=RateLimitsConfig(default_rpm=60, tiers={"premium": 3000}))


def test_an_override_and_its_record_expire_together_and_restore_what_they_replaced(cfg):
    cache = cfg.cache()
    scope = Scope(kind="tier", name="premium")
    assert rate_limits.read(cache, cfg, scope).describe() == "3000/min (the default; no override)"
    cache.set(scope.redis_key(cfg.redis_prefix), 4000, ex=600)  # someone's earlier override
    before = rate_limits.read(cache, cfg, scope)
    rate_limits.set_override(cache, cfg, scope, 6000, 30, "ann", "export", before)
    now = rate_limits.read(cache, cfg, scope)
    assert now.value == 6000 and now.record["by"] == "ann" and now.record["previous"] == "4000"
    assert cache.ttl(scope.record_key(cfg.redis_prefix)) == cache.ttl(scope.redis_key(cfg.redis_prefix)) > 1790
    said = rate_limits.restore(cache, cfg, scope, now.record)
    assert said.startswith("the earlier override of 4000/min")
    assert int(cache.get(scope.redis_key(cfg.redis_prefix))) == 4000 and 590 <= cache.ttl(
        scope.redis_key(cfg.redis_prefix)) <= 600
    assert not cache.exists(scope.record_key(cfg.redis_prefix))


@pytest.mark.parametrize("new, minutes, force, message", [
    (30001, 60, False, "30001/min is outside 300-30000/min"),
    (299, 60, False, "outside"),
    (0, 60, True, "at least 1 request per minute"),
    (100, 0, True, "the duration must be positive"),
])
def test_bounds(new, minutes, force, message):
    with pytest.raises(SecurityError, match=message):
        rate_limits.check_bounds(RateLimitsConfig(tiers={"premium": 3000}), Scope(kind="tier", name="premium"),
                                 new, minutes, force)


def test_the_permanent_diff_edits_the_limits_file_in_place(tmp_path):
    limits = tmp_path / "limits.toml"
    limits.write_text("# limits of the API\ndefault_rpm = 60\n\n[tiers]\nfree = 60 # small\npremium = 3000\n")
    cfg = RateLimitsConfig(config_file=limits)
    assert rate_limits.defaults(cfg) == (60, {"free": 60, "premium": 3000})
    diff = rate_limits.permanent_diff(cfg, Scope(kind="tier", name="premium"), 6000)
    assert "-premium = 3000\n+premium = 6000\n" in diff and " free = 60 # small\n" in diff
    assert "+standard = 600\n" in rate_limits.permanent_diff(cfg, Scope(kind="tier", name="standard"), 600)
    assert "-default_rpm = 60\n+default_rpm = 90\n" in rate_limits.permanent_diff(cfg, Scope(kind="global"), 90)
    with pytest.raises(SecurityError, match="not per key"):
        rate_limits.permanent_diff(cfg, Scope(kind="key", name="7"), 5)
    rendered = rate_limits.permanent_diff(RateLimitsConfig(default_rpm=60), Scope(kind="tier", name="free"), 90)
    assert "rendered from [security.rate_limits]" in rendered and " [tiers]\n+free = 90\n" in rendered
