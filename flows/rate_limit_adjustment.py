"""Runbook 4: raise (or lower) a rate limit for a while when legitimate traffic is
blocked, watch that it helps and harms nothing, and record the decision; and its undo."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from flows._common import announce, run_url, security_targets
from tasks import api_keys, rate_limits
from tasks.concurrency import exclusive
from tasks.config import Settings, load_settings
from tasks.errors import RunbookError
from tasks.notify import Severity
from tasks.postgres import Database, connect
from tasks.prometheus import ErrorRate, MetricsUnavailable, percent, query_value
from tasks.rate_limits import Current, Scope, ScopeKind
from tasks.report import RunReport, first_line
from tasks.security import SecurityConfig, SecurityError

READING_SECONDS = 5.0  # between readings while watching
LIMITED_SHARE_PROMQL = ('sum(rate(fraiseql_rate_limit_decisions_total{decision="limited"}[1m])) / '
                        'sum(rate(fraiseql_rate_limit_decisions_total[1m]))')


class AdjustmentResult(BaseModel):
    scope: str
    old: int
    new: int
    until: datetime | None = None
    permanent: bool = False
    dry_run: bool = False
    limited_before: float | None = None  # share of requests answered 429
    limited_after: float | None = None
    diff: str | None = None


class RevertedEarly(RunbookError):
    """The error rate passed its threshold while the new limit was in force; undone."""


def resolve_scope(db: Database, cfg: SecurityConfig, kind: ScopeKind, target: str | None,
                  any_tier: bool = False) -> Scope:
    """The scope a person named; a tier no key has is refused (a typo would change
    nothing) unless `any_tier`."""
    if kind == "global":
        if target:
            raise SecurityError("a global limit takes no target; nothing changed")
        return Scope(kind="global")
    if kind == "tier":
        tier = rate_limits.check_tier(target)
        if not any_tier:
            with connect(db) as conn:
                used = rate_limits.tiers_in_use(conn, cfg)
            if tier not in used:
                raise SecurityError(f"no key has the tier {tier!r} (tiers in use: {', '.join(used) or 'none'}); "
                                    "pass force to set it anyway. Nothing changed")
        return Scope(kind="tier", name=tier)
    if not target:
        raise SecurityError("a key limit needs the key's id or prefix as target; nothing changed")
    with connect(db) as conn:
        key = api_keys.find(conn, cfg, target)
    return Scope(kind="key", name=str(key.id), tier=key.tier)


@flow(name="rate-limit-adjustment", log_prints=True)
def rate_limit_adjustment(scope: ScopeKind, limit: int, target: str | None = None, duration_minutes: float = 60,
                          reason: str = "", permanent: bool = False, force: bool = False,
                          watch_seconds: float = 300, requested_by: str = "",
                          dry_run: bool = False) -> AdjustmentResult:
    """Change a rate limit for a while and prove it helped (runbook 4).

    Use: legitimate traffic gets 429 Too Many Requests (a customer's bulk export, a
    launch), or a key must be slowed down.
    Steps:
      1. read the limit in force (the Redis override, or the default);
      2. assess the traffic: the share of requests limited and the top consumers of
         the last 5 minutes, and whether they come from addresses they used before;
      3. refuse a limit outside max_factor times the default unless `force`;
      4. set the override with its expiry in one step (SET ... EX), with a record of
         who, why and what it replaced; `permanent` instead proposes the change to
         the service's limits file as a diff and changes nothing;
      5. watch for `watch_seconds`: the 429 share should fall; if the error rate
         passes its threshold, the previous limit is restored at once and people told;
      6. record the decision (who, why, old and new value, until when) and notify.
    `rate-limit-revert` undoes an override before it expires.

    Args:
        scope: global, tier or key.
        limit: The new limit, in requests per minute per key.
        target: The tier name, or the key's id or prefix; empty for global.
        duration_minutes: How long the override lasts before Redis drops it.
        reason: Why (the ticket's "why increased?").
        permanent: Propose the change to the limits file instead of an override.
        force: Allow a limit beyond max_factor times the default.
        watch_seconds: How long to watch the 429 share and the error rate after.
        requested_by: Who asked for it (recorded in the decision).
        dry_run: Assess and check; change nothing.
    """
    settings = load_settings()
    cfg, db, _ = security_targets(settings)
    sc = resolve_scope(db, cfg, scope, target, any_tier=force)
    with RunReport("Rate-limit adjustment", sc.label) as run, exclusive("rate-limit", sc.slug):
        cache = None if permanent and cfg.redis_url is None else rate_limits.open_cache(cfg)
        with run.step("read the current limit") as step:
            if cache:
                before = rate_limits.read(cache, cfg, sc)
            else:  # a permanent change with no Redis: the default is all there is
                default = rate_limits.default_for(cfg.rate_limits, sc)
                before = Current(value=default, default=default)
            step.detail = before.describe()
        run.figure("Limit before", before.describe())
        with run.step("assess the traffic") as step:
            limited_before = assess_traffic(settings, cfg, db, run)
            step.detail = f"{percent(limited_before)} of requests limited"
        rate_limits.check_bounds(cfg.rate_limits, sc, limit, duration_minutes, force)
        result = AdjustmentResult(scope=sc.label, old=before.value, new=limit, permanent=permanent,
                                  dry_run=dry_run, limited_before=limited_before)
        who = requested_by.strip() or "not given"
        if permanent:
            with run.step("propose the permanent change") as step:
                result.diff = rate_limits.permanent_diff(cfg.rate_limits, sc, limit)
                step.detail = "diff in the decision record; nothing changed"
            _decision(settings, run, sc, before, limit, None, who, reason, result.diff)
            run.outcome = "proposed (permanent)"
            return result
        if dry_run:
            run.outcome = "planned (dry run)"
            print(f"Plan: set the {sc.label} limit from {before.value} to {limit}/min for {duration_minutes:g} min, "
                  f"watch {watch_seconds:g}s")
            return result
        assert cache is not None
        with run.step("set the override") as step:
            result.until = rate_limits.set_override(cache, cfg, sc, limit, duration_minutes, who, reason, before)
            step.detail = f"{limit}/min until {result.until:%H:%M:%S} UTC"
        try:
            with run.step(f"watch for {watch_seconds:g}s") as step:
                result.limited_after = _watch(settings, cfg, db, run, watch_seconds)
                step.detail = f"{percent(result.limited_after)} limited (was {percent(limited_before)})"
        except RevertedEarly as exc:
            now = rate_limits.read(cache, cfg, sc)
            if now.override in (limit, None):  # ours, or expired: put back what this run found
                said = "reverted to " + rate_limits.restore(cache, cfg, sc, rate_limits.undo_record(before))
            else:
                said = f"not reverted: someone set {now.override}/min meanwhile ({now.record.get('by', 'unknown')})"
            run.figure("Reverted", f"{said}: {exc}")
            announce(settings, run, Severity.HIGH, f"The {sc.label} limit of {limit}/min was {said}: {exc}",
                     failed=exc)
            raise
        _decision(settings, run, sc, before, limit, result.until, who, reason, None)
        run.outcome = "adjusted"
        return result


@flow(name="rate-limit-revert", log_prints=True)
def rate_limit_revert(scope: ScopeKind, target: str | None = None, reason: str = "",
                      requested_by: str = "") -> AdjustmentResult:
    """Undo a rate-limit override before it expires (runbook 4's "when to revert").

    Use: the bulk job finished early, or the override did harm.
    Steps: read the override and its record; put back what it replaced (an earlier
    override with its remaining time, or the default); record and notify. An override
    that already expired is reported as reverted.

    Args:
        scope: global, tier or key.
        target: The tier name, or the key's id or prefix; empty for global.
        reason: Why it is undone.
        requested_by: Who asked for it.
    """
    settings = load_settings()
    cfg, db, _ = security_targets(settings)
    sc = resolve_scope(db, cfg, scope, target, any_tier=True)
    cache = rate_limits.open_cache(cfg)
    with RunReport("Rate-limit revert", sc.label) as run, exclusive("rate-limit", sc.slug):
        with run.step("read the override") as step:
            before = rate_limits.read(cache, cfg, sc)
            step.detail = before.describe()
        if before.override is None:
            run.outcome = "already reverted"
            run.figure("Limit", f"{before.value}/min: no override in place (it expired or was never set)")
            print(f"No {sc.label} override in place (expired or never set): {before.value}/min applies")
            return AdjustmentResult(scope=sc.label, old=before.value, new=before.value)
        with run.step("restore what it replaced") as step:
            restored = rate_limits.restore(cache, cfg, sc, before.record)
            after = rate_limits.read(cache, cfg, sc)
            step.detail = f"{restored}: {after.value}/min"
        _decision(settings, run, sc, before, after.value, None, requested_by.strip() or "not given",
                  reason or "reverted", None, verb="reverted")
        run.outcome = "reverted"
        return AdjustmentResult(scope=sc.label, old=before.value, new=after.value)


def assess_traffic(settings: Settings, cfg: SecurityConfig, db: Database, run: RunReport) -> float | None:
    """The 429 share and the top consumers now, into the report: is it legitimate?"""
    with connect(db) as conn:
        consumers = rate_limits.top_consumers(conn, cfg)
        limited, total = rate_limits.limited_share(conn, cfg, 300)
    share = limited / total if total else None
    run.figure("Limited (audit log, 5 min)", f"{limited} of {total} requests ({percent(share)})")
    if settings.prometheus is not None:
        try:
            run.figure("Limited (Prometheus, 1 min)", percent(query_value(settings.prometheus, LIMITED_SHARE_PROMQL)))
        except MetricsUnavailable as exc:
            run.figure("Limited (Prometheus, 1 min)", f"unknown ({first_line(exc)})")
    rows: list[dict[str, Any]] = [
        {"key": c.key_prefix, "tier": c.tier or "", "requests (5 min)": c.requests, "limited": c.limited,
         "addresses": c.addresses, "from known addresses": f"{c.known_addresses_share:.0%}"} for c in consumers]
    create_table_artifact(table=rows or [{"key": "no requests in the last 5 minutes"}], key="rate-limit-consumers",
                          description="Top consumers of the last 5 minutes (known addresses: used by the key "
                                      "in the day before: a sign of its owner)")
    run.figure("Top consumers", "; ".join(f"{c.key_prefix} {c.requests} ({c.limited} limited, "
                                          f"{c.known_addresses_share:.0%} from known addresses)"
                                          for c in consumers[:5]) or "none")
    return share


def _watch(settings: Settings, cfg: SecurityConfig, db: Database, run: RunReport, seconds: float) -> float | None:
    """Readings of the 429 share (audit log) and the error rate (Prometheus, when
    configured) until `seconds` pass; raise RevertedEarly when the error rate is too high."""
    errors = None
    if settings.prometheus is not None:
        svc = settings.service(cfg.service)
        errors = ErrorRate(settings.prometheus, svc.error_rate_promql(cfg.service), cfg.rate_limits.error_rate_threshold)
    start, readings, share = time.monotonic(), [], None
    while True:
        window = max(READING_SECONDS, min(60.0, time.monotonic() - start))
        with connect(db) as conn:
            limited, total = rate_limits.limited_share(conn, cfg, window)
        share = limited / total if total else None
        note = f"{time.monotonic() - start:.0f}s: {percent(share)} limited"
        if errors:
            try:
                rate = errors.read()
                note += f", errors {percent(rate)}"
                if errors.too_high(rate):
                    readings.append(note)
                    run.figure("Readings", "; ".join(readings))
                    raise RevertedEarly(f"the error rate rose to {errors.describe(rate)} with the new limit")
            except MetricsUnavailable as exc:
                note += f", errors unknown ({first_line(exc)})"
        readings.append(note)
        run.figure("Readings", "; ".join(readings))
        if time.monotonic() - start >= seconds:
            return share
        time.sleep(min(READING_SECONDS, max(0.0, seconds - (time.monotonic() - start))))


def _decision(settings: Settings, run: RunReport, sc: Scope, before: Current, new: int, until: datetime | None,
              who: str, reason: str, diff: str | None, verb: str = "adjusted") -> None:
    """The reference's "document decision": who, why, old and new, until when."""
    lasting = (f"{until:%Y-%m-%d %H:%M:%S} UTC (Redis drops it then; `rate-limit-revert` ends it sooner)"
               if until else "permanent, once the diff below is deployed" if diff else "now")
    lines = [f"# Rate limit {verb}: {sc.label}", "",
             f"- **Who:** {who}" + (f" (run {run_url()})" if run_url() else ""),
             f"- **Why:** {reason or 'not given'}",
             f"- **Old value:** {before.describe()}",
             f"- **New value:** {new}/min",
             f"- **Until:** {lasting}"]
    if diff:
        lines += ["", "## The change to deploy", "", "```diff", diff.rstrip(), "```"]
    create_markdown_artifact(markdown="\n".join(lines) + "\n", key=f"rate-limit-decision-{sc.slug}"[:100],
                             description=f"Rate-limit decision for {sc.label}")
    for name, value in (("Who", who), ("Why", reason or "not given"), ("New value", f"{new}/min"), ("Until", lasting)):
        run.figure(name, value)
    announce(settings, run, Severity.MEDIUM, f"The {sc.label} rate limit {verb}: {before.value} → {new}/min, "
             f"{lasting}. Why: {reason or 'not given'}.")
