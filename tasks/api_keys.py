"""API keys of a service: find one, gather what it did from the audit log, revoke it,
drop its cached lookup, prove the service refuses it, and issue its replacement.

The replacement's plaintext exists only inside `issue_replacement`: it is written once
to a file readable only by its owner and never returned, logged or raised.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql
from pydantic import BaseModel

from tasks.errors import RunbookError
from tasks.postgres import Database, connect
from tasks.report import utc
from tasks.retries import RETRY_OPTIONS
from tasks.security import SecurityConfig, SecurityError

MAX_LISTED = 10  # keys listed when a prefix matches several


class ApiKey(BaseModel):
    id: int
    user_id: int
    key_prefix: str
    key_hash: str
    tier: str
    permissions: list[str]
    created_at: datetime
    revoked_at: datetime | None = None
    revoke_reason: str | None = None
    replaced_by: int | None = None
    last_used_at: datetime | None = None

    def describe(self) -> str:
        state = f"revoked {self.revoked_at:%Y-%m-%d %H:%M:%S} UTC" if self.revoked_at else "active"
        return f"key {self.id} ({self.key_prefix}…, user {self.user_id}, tier {self.tier}, {state})"


_COLUMNS = ("id, user_id, key_prefix, key_hash, tier, permissions, created_at, revoked_at, revoke_reason, "
            "replaced_by, last_used_at")


def _key(row: tuple[Any, ...]) -> ApiKey:
    return ApiKey(**dict(zip([c.strip() for c in _COLUMNS.split(",")], row)))


def is_whole_key(cfg: SecurityConfig, ref: str) -> bool:
    """A leaked key pasted whole: it is looked up by its hash and never shown."""
    return ref.strip().startswith(cfg.key_prefix) and len(ref.strip()) > len(cfg.key_prefix) + 16


def shown(cfg: SecurityConfig, ref: str) -> str:
    """`ref` as reports and messages may show it: a whole key only by its display prefix."""
    ref = ref.strip()
    return ref[: len(cfg.key_prefix) + 8] + "…" if is_whole_key(cfg, ref) else ref


def find(conn: psycopg.Connection, cfg: SecurityConfig, ref: str) -> ApiKey:
    """The key `ref` names: its id (digits), the start of its display prefix, or the whole
    key (by its hash). Text is matched literally (no wildcards); several matches are
    refused with a list."""
    ref = ref.strip()
    table = cfg.table(cfg.keys_table)
    if is_whole_key(cfg, ref):
        query = sql.SQL("SELECT {} FROM {} WHERE key_hash = %s").format(sql.SQL(_COLUMNS), table)
        rows = conn.execute(query, (hash_key(ref),)).fetchall()
        if not rows:
            raise SecurityError(f"no API key matches the key given ({shown(cfg, ref)}); nothing was changed")
        return _key(rows[0])
    if not ref or len(ref) > 64 or not ref.isprintable():
        raise SecurityError("give a key id or the start of its prefix (printable, at most 64 characters)")
    if ref.isascii() and ref.isdigit():
        query = sql.SQL("SELECT {} FROM {} WHERE id = %s").format(sql.SQL(_COLUMNS), table)
        rows = conn.execute(query, (int(ref),)).fetchall()
    else:
        query = sql.SQL("SELECT {} FROM {} WHERE starts_with(key_prefix, %s) ORDER BY id LIMIT %s").format(
            sql.SQL(_COLUMNS), table)
        rows = conn.execute(query, (ref, MAX_LISTED + 1)).fetchall()
    if not rows:
        raise SecurityError(f"no API key has the id or prefix {ref!r}; nothing was changed")
    if len(rows) > 1:
        keys = [_key(r) for r in rows]
        listed = "; ".join(k.describe() for k in keys[:MAX_LISTED])
        more = " and more" if len(keys) > MAX_LISTED else ""
        raise SecurityError(f"{ref!r} matches several keys: {listed}{more}. Give the key id or a longer "
                            "prefix; nothing was changed")
    return _key(rows[0])


# --- evidence ------------------------------------------------------------------------------


class Evidence(BaseModel):
    """What a key did, from the audit log."""

    window_hours: float
    requests: int = 0
    refused: int = 0
    rows_returned: int = 0
    first_use: datetime | None = None
    last_use: datetime | None = None
    by_hour: list[tuple[datetime, int, int, int]] = []  # hour, requests, refused, rows
    fields: list[tuple[str, int, datetime]] = []  # table.field, requests, first read
    source_ips: list[tuple[str, int, datetime, datetime]] = []  # ip, requests, first, last
    pii_fields: list[str] = []
    new_pii_fields: list[str] = []
    new_source_ips: list[str] = []
    recent_requests: int = 0
    recent_per_minute: float = 0.0
    baseline_per_minute: float = 0.0
    rate_spike: bool = False
    request_rate: str | None = None  # from Prometheus, when configured

    def signs(self) -> dict[str, bool]:
        return {"new_pii_fields": bool(self.new_pii_fields), "pii_fields": bool(self.pii_fields),
                "rate_spike": self.rate_spike, "new_source_ips": bool(self.new_source_ips)}

    def summary(self) -> list[tuple[str, str]]:
        """The evidence as (figure, value), for the approval form, the report and the notices."""
        out = [("Requests", f"{self.requests} in the last {self.window_hours:g} h ({self.refused} refused), "
                            f"{self.rows_returned} rows returned"),
               ("First and last use", f"{when_utc(self.first_use)}; {when_utc(self.last_use)}"),
               ("Recent rate", f"{self.recent_per_minute:.1f}/min against a baseline of "
                               f"{self.baseline_per_minute:.2f}/min" + (" (a spike)" if self.rate_spike else "")),
               ("Fields read", ", ".join(f for f, _, _ in self.fields) or "none"),
               ("PII fields read", (", ".join(self.pii_fields) or "none")
                + (f" (new: {', '.join(self.new_pii_fields)})" if self.new_pii_fields else "")),
               ("Source IPs", (", ".join(f"{ip} ({n})" for ip, n, _, _ in self.source_ips[:5]) or "none")
                + (f" (new: {', '.join(self.new_source_ips[:5])})" if self.new_source_ips else ""))]
        if self.request_rate:
            out.append(("Request rate in Prometheus", self.request_rate))
        return out

    def lines(self) -> list[str]:
        return [f"{name}: {value}" for name, value in self.summary()]


def when_utc(value: datetime | None) -> str:
    return utc(value, "never")


def gather_evidence(conn: psycopg.Connection, cfg: SecurityConfig, key: ApiKey,
                    now: datetime | None = None) -> Evidence:
    """Requests by hour, fields and tables read, source IPs, rows, first and last use over
    the evidence window; and the signs the auto-revoke policy looks at: PII fields and
    source IPs new against the baseline, and the recent rate against the baseline rate."""
    conn.execute("SET TIME ZONE 'UTC'")  # hours and times below are UTC, as the report says
    now = now or datetime.now(timezone.utc)
    policy = cfg.auto_revoke
    start = now - timedelta(hours=cfg.evidence_hours)
    recent = now - timedelta(minutes=policy.spike_minutes)
    baseline_start = now - timedelta(days=policy.baseline_days)
    audit = cfg.table(cfg.audit_table)
    # A replacement inherits the history of the key it replaced: its first reads are not "new".
    lineage = [key.id] + [r[0] for r in conn.execute(sql.SQL("SELECT id FROM {} WHERE replaced_by = %s").format(
        cfg.table(cfg.keys_table)), (key.id,)).fetchall()]
    born = min([key.created_at, *(r[0] for r in conn.execute(sql.SQL(
        "SELECT created_at FROM {} WHERE id = ANY(%s)").format(cfg.table(cfg.keys_table)), (lineage,)).fetchall())])
    where = sql.SQL("action = 'api.request' AND target = %(target)s AND created_at >= %(start)s "
                    "AND created_at <= %(now)s")
    p = {"target": f"api_key:{key.id}", "start": start, "now": now, "recent": recent, "base": baseline_start,
         "ancestors": [f"api_key:{i}" for i in lineage[1:]]}

    def q(query: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        return conn.execute(sql.SQL(query).format(audit=audit, where=where), params or p).fetchall()

    ev = Evidence(window_hours=cfg.evidence_hours)
    ev.by_hour = [(h, int(n), int(bad), int(rows or 0)) for h, n, bad, rows in q(
        "SELECT date_trunc('hour', created_at), count(*), "
        "count(*) FILTER (WHERE (details->>'status')::int >= 400), sum((details->>'rows')::int) "
        "FROM {audit} WHERE {where} GROUP BY 1 ORDER BY 1")]
    ev.requests = sum(n for _, n, _, _ in ev.by_hour)
    ev.refused = sum(b for _, _, b, _ in ev.by_hour)
    ev.rows_returned = sum(r for _, _, _, r in ev.by_hour)
    first_last = q("SELECT min(created_at), max(created_at) FROM {audit} WHERE {where}")[0]
    ev.first_use, ev.last_use = first_last
    ev.fields = [(f, int(n), first) for f, n, first in q(
        "SELECT f, count(*), min(created_at) FROM {audit}, jsonb_array_elements_text(details->'fields') f "
        "WHERE {where} GROUP BY f ORDER BY f")]
    ev.source_ips = [(ip, int(n), a, b) for ip, n, a, b in q(
        "SELECT details->>'ip', count(*), min(created_at), max(created_at) FROM {audit} WHERE {where} "
        "GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 50")]
    pii = set(cfg.pii_fields)
    ev.pii_fields = [f for f, _, _ in ev.fields if f in pii]

    # What the key did before the recent window, for "new" and "spike".
    # Before the recent window for the key itself; all along for the keys it replaced.
    before = sql.SQL("action = 'api.request' AND created_at >= %(base)s AND ((target = %(target)s AND "
                     "created_at < %(recent)s) OR (target = ANY(%(ancestors)s) AND created_at <= %(now)s))")
    old_fields = {r[0] for r in conn.execute(sql.SQL(
        "SELECT DISTINCT f FROM {audit}, jsonb_array_elements_text(details->'fields') f WHERE {before}").format(
        audit=audit, before=before), p).fetchall()}
    old_ips = {r[0] for r in conn.execute(sql.SQL(
        "SELECT DISTINCT details->>'ip' FROM {audit} WHERE {before}").format(audit=audit, before=before),
        p).fetchall()}
    recent_fields = {r[0] for r in q(
        "SELECT DISTINCT f FROM {audit}, jsonb_array_elements_text(details->'fields') f "
        "WHERE {where} AND created_at >= %(recent)s")}
    recent_ips = {r[0] for r in q("SELECT DISTINCT details->>'ip' FROM {audit} WHERE {where} "
                                  "AND created_at >= %(recent)s")}
    ev.new_pii_fields = sorted((recent_fields & pii) - old_fields)
    ev.new_source_ips = sorted(ip for ip in recent_ips - old_ips if ip)
    ev.recent_requests = int(q("SELECT count(*) FROM {audit} WHERE {where} AND created_at >= %(recent)s")[0][0])
    baseline = int(conn.execute(sql.SQL(
        "SELECT count(*) FROM {audit} WHERE action = 'api.request' AND created_at >= %(start)s AND ((target = "
        "%(target)s AND created_at < %(recent)s) OR (target = ANY(%(ancestors)s) AND created_at <= %(now)s))").format(
        audit=audit), p).fetchone()[0])
    ev.recent_per_minute = ev.recent_requests / policy.spike_minutes
    baseline_minutes = (recent - max(start, born)).total_seconds() / 60  # only while the key (line) existed
    ev.baseline_per_minute = baseline / max(baseline_minutes, 1)
    ev.rate_spike = (ev.recent_requests >= policy.spike_min_requests
                     and ev.recent_per_minute >= policy.spike_factor * ev.baseline_per_minute)
    return ev


def policy_met(cfg: SecurityConfig, evidence: Evidence) -> tuple[bool, str]:
    """(revoke without a person?, why): every sign the policy lists must be present."""
    wanted = cfg.auto_revoke.when
    if not wanted:
        return False, "the policy always asks a person ([security.auto_revoke] when = [])"
    signs = evidence.signs()
    missing = [s for s in wanted if not signs[s]]
    if missing:
        return False, f"policy not met: no {', '.join(missing)} in the evidence"
    return True, f"policy met: {' and '.join(wanted)}"


# --- changes -------------------------------------------------------------------------------


@task(name="revoke-key", cache_policy=NO_CACHE, **RETRY_OPTIONS)
def revoke(db: Database, cfg: SecurityConfig, key_id: int, reason: str) -> datetime | None:
    """Set revoked_at and revoke_reason (parameterised); None when it already was revoked."""
    with connect(db) as conn:
        row = conn.execute(sql.SQL("UPDATE {} SET revoked_at = now(), revoke_reason = %s "
                                   "WHERE id = %s AND revoked_at IS NULL RETURNING revoked_at").format(
            cfg.table(cfg.keys_table)), (reason, key_id)).fetchone()
        conn.commit()
    return row[0] if row else None


@task(name="drop-cached-key", cache_policy=NO_CACHE, **RETRY_OPTIONS)
def drop_cached(cfg: SecurityConfig, key_hash: str) -> int:
    """Delete the service's cached lookup of the key (0 when nothing was cached)."""
    cache = cfg.cache()
    if cache is None:
        return 0
    try:
        return int(cache.delete(f"{cfg.redis_prefix}apikey:{key_hash}"))
    finally:
        cache.close()


def _drop_quietly(cfg: SecurityConfig, key_hash: str) -> None:
    try:
        drop_cached.fn(cfg, key_hash)
    except redis.RedisError:
        pass  # the drop step already said what Redis did


class StillAccepted(RunbookError):
    """The key is revoked in the database, but the service did not refuse it in time."""


def verify_refused(base_url: str, cfg: SecurityConfig, key_hash: str, deadline_seconds: float,
                   interval: float = 0.2) -> tuple[float, int]:
    """Ask the live service until it answers 401 for the key: (seconds waited, attempts).
    Connection errors and other answers are tried again until the deadline; after an
    answer that still accepts the key, its cached lookup is dropped again (a request
    that read the key just before the revocation may have cached it after the drop)."""
    url = base_url.rstrip("/") + cfg.auth_check_path
    t0, attempts, last = time.monotonic(), 0, "no answer"
    with httpx.Client(timeout=5) as client:
        while True:
            attempts += 1
            try:
                answer = client.post(url, json={"key_hash": key_hash})
                if answer.status_code == 401:
                    return time.monotonic() - t0, attempts
                last = f"answered {answer.status_code}"
                if answer.status_code == 200:
                    _drop_quietly(cfg, key_hash)
            except httpx.HTTPError as exc:
                last = f"unreachable ({type(exc).__name__})"
            if time.monotonic() - t0 >= deadline_seconds:
                raise StillAccepted(f"the key is revoked in the database, but {url} {last} after "
                                    f"{deadline_seconds:g}s and {attempts} tries (expected 401)")
            time.sleep(interval)


class Replacement(BaseModel):
    """A replacement key as the report may show it: never the plaintext."""

    id: int
    key_prefix: str
    delivery_file: Path


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def issue_replacement(db: Database, cfg: SecurityConfig, old: ApiKey) -> Replacement:
    """A new key with the old one's owner, tier and permissions; only its hash is stored.
    The plaintext goes once into a new 0600 file in the delivery directory, written
    before the transaction commits: a failed write leaves no key nobody can use, and a
    failed commit removes the file."""
    plaintext = cfg.key_prefix + secrets.token_hex(32)
    prefix = plaintext[: len(cfg.key_prefix) + 8]
    directory = cfg.delivery_dir
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path: Path | None = None
    committed = False
    try:
        with connect(db) as conn:
            table = cfg.table(cfg.keys_table)
            new_id = conn.execute(sql.SQL(
                "INSERT INTO {} (user_id, key_prefix, key_hash, tier, permissions) VALUES (%s, %s, %s, %s, %s) "
                "RETURNING id").format(table), (old.user_id, prefix, hash_key(plaintext), old.tier,
                                                old.permissions)).fetchone()[0]
            linked = conn.execute(sql.SQL("UPDATE {} SET replaced_by = %s WHERE id = %s AND replaced_by IS NULL "
                                          "RETURNING id").format(table), (new_id, old.id)).fetchone()
            if linked is None:  # another run issued one meanwhile: this one is rolled back
                raise SecurityError(f"key {old.id} already has a replacement; no second one was issued")
            path = directory / f"api-key-{new_id}-user-{old.user_id}.txt"
            _write_once(path, f"# Replacement for API key {old.id} ({old.key_prefix}…) of user {old.user_id}, "
                              f"tier {old.tier}.\n# Hand it to the owner over a secure channel, then delete "
                              f"this file (`runbooks api-key claim` does both).\n{plaintext}\n")
            conn.commit()
            committed = True
    except BaseException:
        if path is not None and path.exists() and not committed:
            path.unlink()
        raise
    finally:
        del plaintext
    return Replacement(id=new_id, key_prefix=prefix, delivery_file=path)


def _write_once(path: Path, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise SecurityError(f"cannot create the delivery file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as out:
        out.write(text)


DELIVERY_NAME = re.compile(r"api-key-\d+-user-\d+\.txt")


def claim(path: Path, delivery_dir: Path) -> str:
    """Read a delivery file once: its key, and the file is gone. Only the delivery
    directory's own files are read."""
    if path.resolve().parent != delivery_dir.resolve() or not DELIVERY_NAME.fullmatch(path.name):
        raise SecurityError(f"{path} is not a delivery file of {delivery_dir} (api-key-<id>-user-<id>.txt)")
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise SecurityError(f"cannot read {path}: {exc.strerror} (a delivered key is read only once)") from None
    keys = [line for line in lines if line and not line.startswith("#")]
    if len(keys) != 1:
        raise SecurityError(f"{path} is not a key delivery file")
    path.unlink()
    return keys[0]
