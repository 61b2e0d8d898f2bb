"""A service's rate limits: what applies now, overrides in Redis with an expiry (and a
record of what they replaced, so a revert restores it exactly), the traffic that hits
the limits, and a permanent change as a diff of the service's limits file.

Redis, under the service's prefix: `rate_limit:global:requests_per_minute`,
`rate_limit:tier:<tier>:requests_per_minute`, `rate_limit:key:<id>:requests_per_minute`
(the most specific one set wins), and beside each override `rate_limit_override:<scope>`,
a hash of who set it, why, the value before and when it ends.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from datetime import datetime, timedelta, timezone
from typing import Literal

import psycopg
import redis
from psycopg import sql
from pydantic import BaseModel

from tasks.errors import ConfigError
from tasks.security import RateLimitsConfig, SecurityConfig, SecurityError

ScopeKind = Literal["global", "tier", "key"]
_TIER = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class Scope(BaseModel):
    kind: ScopeKind
    name: str = ""  # the tier, or the key id; "" for global
    tier: str | None = None  # a key's tier (its default comes from it)

    @property
    def label(self) -> str:
        return "global" if self.kind == "global" else f"{self.kind} {self.name}"

    @property
    def slug(self) -> str:
        """The label as artifact keys and slot names allow it (a-z, 0-9, -)."""
        return re.sub(r"[^a-z0-9-]+", "-", self.label.lower()).strip("-")

    def redis_key(self, prefix: str) -> str:
        middle = "global" if self.kind == "global" else f"{self.kind}:{self.name}"
        return f"{prefix}rate_limit:{middle}:requests_per_minute"

    def record_key(self, prefix: str) -> str:
        return f"{prefix}rate_limit_override:{'global' if self.kind == 'global' else f'{self.kind}:{self.name}'}"


def open_cache(cfg: SecurityConfig) -> redis.Redis:
    """The service's Redis, answering, or a clear error."""
    cache = cfg.cache()
    if cache is None:
        raise ConfigError("[security] has no redis_url: the service's limits live in Redis")
    try:
        cache.ping()
    except redis.RedisError as exc:
        raise SecurityError(f"the service's Redis cannot be reached ({type(exc).__name__}); nothing changed") from None
    return cache


def check_tier(name: str | None) -> str:
    if not name or not _TIER.fullmatch(name):
        raise SecurityError("a tier name is lowercase letters, digits, '-' and '_' (e.g. premium)")
    return name


def tiers_in_use(conn: psycopg.Connection, cfg: SecurityConfig) -> list[str]:
    return [r[0] for r in conn.execute(sql.SQL("SELECT DISTINCT tier FROM {} ORDER BY 1").format(
        cfg.table(cfg.keys_table))).fetchall()]


def defaults(limits: RateLimitsConfig) -> tuple[int, dict[str, int]]:
    """(default, per tier): from the service's limits file when configured, else [security.rate_limits]."""
    if limits.config_file is None:
        return limits.default_rpm, dict(limits.tiers)
    try:
        data = tomllib.loads(limits.config_file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"security.rate_limits.config_file {limits.config_file}: cannot read it: {exc}") from None
    return int(data.get("default_rpm", limits.default_rpm)), {k: int(v) for k, v in data.get("tiers", {}).items()}


def default_for(limits: RateLimitsConfig, scope: Scope) -> int:
    default, tiers = defaults(limits)
    tier = scope.name if scope.kind == "tier" else scope.tier
    return tiers.get(tier, default) if tier else default


class Current(BaseModel):
    """What applies to a scope now."""

    value: int  # the limit in force for it
    override: int | None = None  # its own override in Redis, if any
    expires_in: float | None = None  # seconds left on that override; None: no expiry
    expires_at: datetime | None = None  # the same, as a moment
    default: int
    record: dict[str, str] = {}  # who set the override, why, what it replaced

    def describe(self) -> str:
        if self.override is None:
            return f"{self.value}/min (the default; no override)"
        left = "no expiry" if self.expires_in is None else f"{_span(self.expires_in)} left"
        who = f", set by {self.record['by']}: {self.record.get('reason', '')}" if self.record.get("by") else ""
        return f"{self.value}/min (override, {left}{who}; default {self.default}/min)"


def _span(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def read(cache: redis.Redis, cfg: SecurityConfig, scope: Scope) -> Current:
    key = scope.redis_key(cfg.redis_prefix)
    value, ttl_ms, record = _pipeline(cache, key, scope.record_key(cfg.redis_prefix))
    default = default_for(cfg.rate_limits, scope)
    if value is None:
        return Current(value=default, default=default)
    left = ttl_ms / 1000 if ttl_ms >= 0 else None
    return Current(value=int(value), override=int(value), default=default, expires_in=left,
                   expires_at=datetime.now(timezone.utc) + timedelta(seconds=left) if left is not None else None,
                   record={k.decode(): v.decode() for k, v in record.items()})


def _pipeline(cache: redis.Redis, key: str, record_key: str) -> tuple[bytes | None, int, dict]:
    pipe = cache.pipeline(transaction=True)
    pipe.get(key).pttl(key).hgetall(record_key)
    value, ttl_ms, record = pipe.execute()
    return value, int(ttl_ms), record


def check_bounds(limits: RateLimitsConfig, scope: Scope, new: int, minutes: float, force: bool) -> None:
    """A limit of at least 1 and a positive duration always; within max_factor of the
    default unless forced."""
    if new < 1:
        raise SecurityError(f"the new limit must be at least 1 request per minute (got {new}); nothing changed")
    if not math.isfinite(minutes) or minutes <= 0:
        raise SecurityError(f"the duration must be positive (got {minutes:g} min); nothing changed")
    default = default_for(limits, scope)
    low, high = default / limits.max_factor, default * limits.max_factor
    if not force and not low <= new <= high:
        raise SecurityError(f"{new}/min is outside {low:g}-{high:g}/min ({limits.max_factor:g}x the {scope.label} "
                            f"default of {default}/min); pass force to set it anyway. Nothing changed")


def undo_record(before: Current) -> dict[str, str]:
    """What an override keeps about the state it replaced: the earlier override, when it
    ends, and its own record."""
    if before.override is None:
        return {"previous": "", "previous_expires_at": "", "previous_record": ""}
    return {"previous": str(before.override),
            "previous_expires_at": before.expires_at.isoformat() if before.expires_at else "",
            "previous_record": json.dumps(before.record) if before.record else ""}


def set_override(cache: redis.Redis, cfg: SecurityConfig, scope: Scope, new: int, minutes: float, by: str,
                 reason: str, before: Current) -> datetime:
    """SET with EX and the record beside it, in one transaction: both expire together."""
    seconds = max(1, round(minutes * 60))
    until = datetime.now(timezone.utc) + timedelta(seconds=seconds)
    record = {"by": by, "reason": reason, "value": str(new), "until": until.isoformat(), **undo_record(before)}
    pipe = cache.pipeline(transaction=True)
    pipe.set(scope.redis_key(cfg.redis_prefix), new, ex=seconds)
    pipe.delete(scope.record_key(cfg.redis_prefix))
    pipe.hset(scope.record_key(cfg.redis_prefix), mapping=record)
    pipe.expire(scope.record_key(cfg.redis_prefix), seconds)
    pipe.execute()
    return until


def restore(cache: redis.Redis, cfg: SecurityConfig, scope: Scope, record: dict[str, str]) -> str:
    """Put back what the override replaced (an earlier override with its remaining
    time and its own record, or nothing: the default). Says what it restored."""
    key, rec = scope.redis_key(cfg.redis_prefix), scope.record_key(cfg.redis_prefix)
    previous, expires = record.get("previous") or "", record.get("previous_expires_at") or ""
    earlier = json.loads(record["previous_record"]) if record.get("previous_record") else {}
    left = (datetime.fromisoformat(expires) - datetime.now(timezone.utc)).total_seconds() if expires else None
    pipe = cache.pipeline(transaction=True)
    pipe.delete(rec)
    if previous and (left is None or left > 1):
        ttl = None if left is None else round(left)
        pipe.set(key, int(previous), ex=ttl)
        if earlier:
            pipe.hset(rec, mapping=earlier)
            if ttl is not None:
                pipe.expire(rec, ttl)
        said = f"the earlier override of {previous}/min" + (f" ({_span(left)} left)" if left else "")
    else:
        pipe.delete(key)
        said = "the default"
    pipe.execute()
    return said


# --- traffic -------------------------------------------------------------------------------


class Consumer(BaseModel):
    key_id: int | None
    key_prefix: str
    tier: str | None
    requests: int
    limited: int
    addresses: int
    known_addresses_share: float  # of its requests, from addresses it used in the day before


def top_consumers(conn: psycopg.Connection, cfg: SecurityConfig, minutes: float = 5,
                  limit: int = 10) -> list[Consumer]:
    """The reference's query: who sends the most requests now, how many were limited,
    and whether they come from addresses the key already used (a sign it is its owner)."""
    audit, keys = cfg.table(cfg.audit_table), cfg.table(cfg.keys_table)
    rows = conn.execute(sql.SQL("""
        WITH recent AS (
            SELECT target, details->>'ip' AS ip, (details->>'status')::int AS status
            FROM {audit} WHERE action = 'api.request' AND target IS NOT NULL
              AND created_at >= now() - %(recent)s * interval '1 minute'),
        known AS (
            SELECT DISTINCT target, details->>'ip' AS ip FROM {audit}
            WHERE action = 'api.request' AND target IN (SELECT target FROM recent)
              AND created_at >= now() - interval '1 day' - %(recent)s * interval '1 minute'
              AND created_at < now() - %(recent)s * interval '1 minute')
        SELECT r.target, count(*), count(*) FILTER (WHERE r.status = 429), count(DISTINCT r.ip),
               count(*) FILTER (WHERE k.ip IS NOT NULL)
        FROM recent r LEFT JOIN known k ON k.target = r.target AND k.ip = r.ip
        GROUP BY r.target ORDER BY 2 DESC LIMIT %(limit)s""").format(audit=audit),
        {"recent": minutes, "limit": limit}).fetchall()
    ids = [int(t.split(":", 1)[1]) for t, *_ in rows if t.startswith("api_key:") and t.split(":", 1)[1].isdigit()]
    info = {i: (p, t) for i, p, t in conn.execute(
        sql.SQL("SELECT id, key_prefix, tier FROM {} WHERE id = ANY(%s)").format(keys), (ids,)).fetchall()}
    out = []
    for target, n, limited, addresses, known in rows:
        key_id = int(target.split(":", 1)[1]) if target.split(":", 1)[1].isdigit() else -1
        prefix, tier = info.get(key_id, (target, None))
        out.append(Consumer(key_id=key_id if key_id >= 0 else None, key_prefix=prefix, tier=tier, requests=n, limited=limited, addresses=addresses,
                            known_addresses_share=known / n if n else 0.0))
    return out


def limited_share(conn: psycopg.Connection, cfg: SecurityConfig, seconds: float) -> tuple[int, int]:
    """(requests answered 429, all requests) in the audit log over the last `seconds`."""
    row = conn.execute(sql.SQL(
        "SELECT count(*) FILTER (WHERE (details->>'status')::int = 429), count(*) FROM {} "
        "WHERE action = 'api.request' AND created_at >= now() - %s * interval '1 second'").format(
        cfg.table(cfg.audit_table)), (seconds,)).fetchone()
    return int(row[0]), int(row[1])


def permanent_diff(limits: RateLimitsConfig, scope: Scope, new: int) -> str:
    """The change to the service's limits file (or, without one, to a file rendered from
    [security.rate_limits]) as a unified diff. A key's limit is no setting of the file."""
    if scope.kind == "key":
        raise SecurityError("a permanent limit is set per tier or globally, not per key: move the key to "
                            "another tier, or use a temporary override")
    if limits.config_file is not None:
        name = str(limits.config_file)
        try:
            before = limits.config_file.read_text()
        except OSError as exc:
            raise ConfigError(f"security.rate_limits.config_file {name}: {exc.strerror}") from None
    else:
        name = "rate_limits.toml (rendered from [security.rate_limits])"
        before = _render(*defaults(limits))
    after = _edit(before, scope, new)
    return "".join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                        fromfile=f"a/{name}", tofile=f"b/{name}"))


def _render(default: int, tiers: dict[str, int]) -> str:
    lines = [f"default_rpm = {default}", "", "[tiers]"] + [f"{t} = {n}" for t, n in sorted(tiers.items())]
    return "\n".join(lines) + "\n"


def _edit(text: str, scope: Scope, new: int) -> str:
    """The file with one value changed (or added) in place, its comments and order kept."""
    section, key = ("", "default_rpm") if scope.kind == "global" else ("tiers", scope.name)
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    current, end_of_section = "", 0 if not section else None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            current = stripped.strip("[]").strip()
            if current == section:
                end_of_section = i + 1
            continue
        if current == section and re.match(rf"{re.escape(key)}\s*=", stripped):
            lines[i] = re.sub(r"=\s*\d+", f"= {new}", line, count=1)
            return "".join(lines)
        if current == section and stripped and section:
            end_of_section = i + 1
    if end_of_section is None:  # no [tiers] table yet
        return "".join(lines) + f"\n[{section}]\n{key} = {new}\n"
    lines.insert(end_of_section, f"{key} = {new}\n")
    return "".join(lines)
