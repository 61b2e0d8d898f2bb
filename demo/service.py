"""The demo target service: a small API shaped like the reference system, for the
runbooks to probe, restart and drill against.

Endpoints (reference: "Health Checks" in 002):
  GET /health   {"status": "healthy", "timestamp", "uptime_seconds"}
  GET /ready    {"ready", "database_connected", "cache_available", "reason"}; 503 when not
  GET /live     {"alive", "pid", "response_time_ms"}
  GET /metrics  Prometheus text: fraiseql_http_requests_total{status},
                fraiseql_query_duration_seconds, fraiseql_query_errors_total,
                fraiseql_db_connections_active, fraiseql_uptime_seconds
                fraiseql_api_key_requests_total{key_prefix,status},
                fraiseql_api_key_pii_requests_total{key_prefix},
                fraiseql_auth_failures_total{reason}, fraiseql_rate_limit_decisions_total{tier,decision}
  GET /api/orders        needs `Authorization: Bearer <api key>` with permission orders:read
  GET /api/profile       the key owner's email and name (PII), permission profile:read
                         Only key hashes are stored; 401 for unknown or revoked keys, 403
                         without the permission, 429 over the limit. Every request is one
                         `api.request` row in audit_logs (docs/demo-service.md).
  POST /admin/auth-check {"key_hash": "<sha256 hex>"}: answers the status a request with
                         that key would get now (200, 401), through the same cache and
                         database lookups: how a revocation is verified without the key
  POST /admin/fault      {"mode": "none" | "hang" | "error" | "api-error" | "slow" | "crash"}
                         (drills; "api-error" fails only /api/, a bug the probes do not see);
                         SIGUSR1 switches to "hang", SIGUSR2 back to "none"

    python -m demo.service --dsn DSN [--redis redis://127.0.0.1:6379/0] [--port 8000]
                           [--fault MODE]   (start faulty: a bad release a restart does not cure)
                           [--limits FILE]  (default_rpm = N, [tiers] premium = N, ...)
A key's limit per minute: the first of the Redis overrides <prefix>rate_limit:key:<id>,
rate_limit:tier:<tier>, rate_limit:global (each :requests_per_minute) that is set, else
its tier's limit from the limits file, else the default.
uvicorn handles SIGTERM gracefully: it stops accepting and lets in-flight requests finish.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import psycopg
import redis
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel

FAULTS = ("none", "hang", "error", "api-error", "slow", "crash")
EXEMPT = ("/admin/", "/live")  # drills must stay switchable; liveness reflects the process


class ServiceSettings(BaseModel):
    dsn: str
    redis_url: str | None = "redis://127.0.0.1:6379/0"  # None: no cache (no rate limits)
    default_rpm: int = 60  # a key's limit per minute without an override in Redis ...
    tier_rpm: dict[str, int] = {}  # ... or its tier's, where the limits file sets one
    slow_seconds: float = 2.0
    check_timeout: float = 2.0
    key_prefix: str = ""  # namespaces this service's Redis keys (tests, several services)
    fault: str = "none"  # the fault it starts with
    key_cache_seconds: int = 300  # a valid key's lookup is cached in Redis this long
    max_key_labels: int = 100  # distinct key prefixes given their own metric label


class AuthCheck(BaseModel):
    key_hash: str


class Fault(BaseModel):
    mode: str


# What each API endpoint reads, and the permission it needs. The fields a person can be
# identified by are PII: the audit log and the metrics say when a key reads them.
PII_FIELDS = frozenset({"users.email", "users.name"})
ENDPOINTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "orders": ("orders:read", "orders", ("orders.id", "orders.status", "orders.total_cents")),
    "profile": ("profile:read", "users", ("users.id", "users.email", "users.name")),
}
TIERS = ("free", "standard", "premium", "enterprise")


class KeyLabels:
    """Bounded metric labels for key prefixes: the first `limit` prefixes seen get their
    own label, later ones share "other"; requests without a known key are "unknown" (the
    text a caller sends never becomes a label)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.seen = limit, set[str]()

    def __call__(self, prefix: str | None) -> str:
        if prefix is None:
            return "unknown"
        if prefix in self.seen or len(self.seen) < self.limit:
            self.seen.add(prefix)
            return prefix
        return "other"


def source_ip(request: Request) -> str:
    """The caller's address; behind a proxy on loopback, the address that proxy added
    (the last X-Forwarded-For entry: the ones before it are the client's to invent)."""
    peer = request.client.host if request.client else "unknown"
    forwarded = request.headers.get("x-forwarded-for", "").split(",")[-1].strip()
    return forwarded if forwarded and peer in ("127.0.0.1", "::1") else peer


def runbooks_section(dsn: str, port: int, state_dir: Path, redis_url: str = "none",
                     command: list[str] | None = None, grace_seconds: float = 5, **settings: Any) -> str:
    """The `[services.api]` section of runbooks.toml that runs this service on `port`
    under the process controller (pid and log file in `state_dir`), writing to the
    `orders` database: how the demo, the tests and the benchmarks configure it.
    `command` replaces the service's argv; `grace_seconds` is how long a stop waits before
    SIGKILL; `settings` are more keys of the section."""
    argv = command or [sys.executable, "-m", "demo.service", "--dsn", dsn, "--port", str(port),
                       "--redis", redis_url]
    keys = {"base_url": f"http://127.0.0.1:{port}", "database": "orders", **settings}
    controller = {"kind": "process", "command": argv, "pid_file": str(state_dir / "api.pid"),
                  "log_file": str(state_dir / "api.log"), "grace_seconds": grace_seconds}
    inline = ", ".join(f"{k} = {json.dumps(v)}" for k, v in controller.items())  # JSON values are TOML
    return "\n".join(["", "[services.api]", *(f"{k} = {json.dumps(v)}" for k, v in keys.items()),
                      f"controller = {{ {inline} }}", ""])


def create_app(settings: ServiceSettings) -> FastAPI:
    app = FastAPI(title="fraiseql-demo", docs_url=None, redoc_url=None)
    started = time.monotonic()
    state: dict[str, Any] = {"fault": settings.fault}
    cache = redis.Redis.from_url(settings.redis_url, socket_timeout=settings.check_timeout,
                                 socket_connect_timeout=settings.check_timeout) if settings.redis_url else None
    registry = CollectorRegistry()
    requests_total = Counter("fraiseql_http_requests_total", "HTTP requests", ["status"], registry=registry)
    query_seconds = Histogram("fraiseql_query_duration_seconds", "API query duration", registry=registry)
    query_errors = Counter("fraiseql_query_errors_total", "API query errors", registry=registry)
    db_active = Gauge("fraiseql_db_connections_active", "Database connections in use", registry=registry)
    uptime = Gauge("fraiseql_uptime_seconds", "Seconds since start", registry=registry)
    uptime.set_function(lambda: time.monotonic() - started)
    key_requests = Counter("fraiseql_api_key_requests_total", "API requests by key prefix (bounded: "
                           "see KeyLabels)", ["key_prefix", "status"], registry=registry)
    pii_requests = Counter("fraiseql_api_key_pii_requests_total", "API requests that returned PII fields",
                           ["key_prefix"], registry=registry)
    auth_failures = Counter("fraiseql_auth_failures_total", "Requests refused 401", ["reason"], registry=registry)
    limit_decisions = Counter("fraiseql_rate_limit_decisions_total", "Rate-limit decisions",
                              ["tier", "decision"], registry=registry)
    key_label = KeyLabels(settings.max_key_labels)

    def set_fault(mode: str) -> None:
        state["fault"] = mode
        print(f"fault injection: {mode}", flush=True)

    try:  # signals work only in the main thread (not under a test's in-process server)
        signal.signal(signal.SIGUSR1, lambda *_: set_fault("hang"))
        signal.signal(signal.SIGUSR2, lambda *_: set_fault("none"))
    except ValueError:
        pass

    @app.middleware("http")
    async def faults_and_metrics(request: Request, call_next):  # type: ignore[no-untyped-def]
        fault = state["fault"]
        if fault != "none" and not request.url.path.startswith(EXEMPT):
            if fault == "crash":
                os._exit(70)
            if fault == "hang":
                await asyncio.sleep(3600)
            if fault == "error" or (fault == "api-error" and request.url.path.startswith("/api/")):
                requests_total.labels("500").inc()
                return JSONResponse({"error": "injected fault"}, status_code=500)
            if fault == "slow":
                await asyncio.sleep(settings.slow_seconds)
        response = await call_next(request)
        if request.url.path != "/metrics":
            requests_total.labels(str(response.status_code)).inc()
        return response

    def query(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        db_active.inc()
        try:
            with psycopg.connect(settings.dsn, connect_timeout=max(1, int(settings.check_timeout))) as conn:
                return conn.execute(sql, params).fetchall()
        finally:
            db_active.dec()

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "healthy", "timestamp": int(time.time()),
                "uptime_seconds": int(time.monotonic() - started)}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        db_ok, cache_ok, reason = True, True, None
        try:
            await run_in_threadpool(query, "SELECT 1")
        except psycopg.Error:
            db_ok, reason = False, "Database unavailable"
        if cache is not None:
            try:
                await run_in_threadpool(cache.ping)
            except redis.RedisError:
                cache_ok, reason = False, reason or "Cache unavailable"
        body = {"ready": db_ok and cache_ok, "database_connected": db_ok,
                "cache_available": cache_ok if cache is not None else None, "reason": reason}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/live")
    def live() -> dict[str, Any]:
        t0 = time.monotonic()
        return {"alive": True, "pid": os.getpid(), "response_time_ms": int((time.monotonic() - t0) * 1000)}

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    @app.post("/admin/fault")
    def fault(body: Fault) -> JSONResponse:
        if body.mode not in FAULTS:
            return JSONResponse({"error": f"mode must be one of {', '.join(FAULTS)}"}, status_code=422)
        set_fault(body.mode)
        return JSONResponse({"fault": body.mode})

    ns = settings.key_prefix

    def lookup(conn: psycopg.Connection, digest: str) -> tuple[dict[str, Any] | None, str]:
        """The key behind a hash, from the cache or the database: (key, "") when it may be
        used, (key, "revoked") or (None, "unknown") when not."""
        cached = None
        if cache is not None:
            try:
                cached = cache.get(f"{ns}apikey:{digest}")
            except redis.RedisError:
                pass  # the database still answers
        if cached:
            return json.loads(cached), ""
        row = conn.execute("SELECT id, user_id, tier, key_prefix, permissions, revoked_at IS NOT NULL "
                           "FROM api_keys WHERE key_hash = %s", (digest,)).fetchone()
        if row is None:
            return None, "unknown"
        key = {"id": row[0], "user_id": row[1], "tier": row[2], "prefix": row[3], "permissions": list(row[4])}
        if row[5]:
            return key, "revoked"  # known, so its refused attempts land in its own audit trail
        if cache is not None:
            try:
                cache.set(f"{ns}apikey:{digest}", json.dumps(key), ex=settings.key_cache_seconds)
            except redis.RedisError:
                pass
        return key, ""

    def limit_for(key: dict[str, Any]) -> tuple[int, int]:
        """(limit, used this minute): the most specific override in Redis wins (key, tier,
        global), else the default. Raises RedisError."""
        assert cache is not None
        names = [f"{ns}rate_limit:key:{key['id']}:requests_per_minute",
                 f"{ns}rate_limit:tier:{key['tier']}:requests_per_minute",
                 f"{ns}rate_limit:global:requests_per_minute"]
        default = settings.tier_rpm.get(key["tier"], settings.default_rpm)
        limit = next((int(v) for v in cache.mget(names) if v is not None), default)
        window = f"{ns}rate:{key['id']}:{int(time.time() // 60)}"
        used = cache.incr(window)
        cache.expire(window, 120)
        return limit, int(used)

    def audit(conn: psycopg.Connection, key: dict[str, Any] | None, operation: str, status: int,
              ip: str, fields: tuple[str, ...] = (), rows: int = 0, t0: float = 0.0) -> None:
        details = {"api_key_id": key["id"] if key else None, "key_prefix": key["prefix"] if key else None,
                   "operation": operation, "tables": sorted({f.split(".")[0] for f in fields}),
                   "fields": list(fields), "ip": ip, "rows": rows, "status": status,
                   "duration_ms": round((time.monotonic() - t0) * 1000, 1)}
        conn.execute("INSERT INTO audit_logs (actor_user_id, action, target, details) "
                     "VALUES (%s, 'api.request', %s, %s)",
                     (key["user_id"] if key else None, f"api_key:{key['id']}" if key else None, json.dumps(details)))

    def api(request: Request, operation: str) -> JSONResponse:
        """Authenticate, authorise, limit, answer, audit: one connection per request."""
        t0, ip = time.monotonic(), source_ip(request)
        permission, table, fields = ENDPOINTS[operation]
        scheme, _, raw = request.headers.get("authorization", "").partition(" ")
        db_active.inc()
        try:
            with query_seconds.time(), psycopg.connect(
                    settings.dsn, connect_timeout=max(1, int(settings.check_timeout)), autocommit=True) as conn:
                if scheme.lower() != "bearer" or not raw.strip():
                    key, why = None, "missing"
                else:
                    key, why = lookup(conn, hashlib.sha256(raw.strip().encode()).hexdigest())
                label = key_label(key["prefix"] if key else None)
                if key is None or why:
                    auth_failures.labels(why).inc()
                    key_requests.labels(label, "401").inc()
                    audit(conn, key, operation, 401, ip, t0=t0)
                    return JSONResponse({"error": "missing or malformed API key" if why == "missing"
                                         else "unknown or revoked API key"}, status_code=401)
                if permission not in key["permissions"]:
                    key_requests.labels(label, "403").inc()
                    audit(conn, key, operation, 403, ip, t0=t0)
                    return JSONResponse({"error": f"this key lacks {permission}"}, status_code=403)
                limit, used = settings.default_rpm, 0
                if cache is not None:  # without a cache (demo without Redis) nothing is limited
                    try:
                        limit, used = limit_for(key)
                    except redis.RedisError:
                        return JSONResponse({"error": "rate limiter unavailable"}, status_code=503)
                tier = key["tier"] if key["tier"] in TIERS else "other"
                if used > limit:
                    limit_decisions.labels(tier, "limited").inc()
                    key_requests.labels(label, "429").inc()
                    audit(conn, key, operation, 429, ip, t0=t0)
                    return JSONResponse({"error": f"rate limit of {limit}/min exceeded"},
                                        status_code=429, headers={"Retry-After": "60"})
                limit_decisions.labels(tier, "allowed").inc()
                if operation == "orders":
                    found = conn.execute("SELECT id, status, total_cents FROM orders WHERE user_id = %s "
                                         "ORDER BY id LIMIT 10", (key["user_id"],)).fetchall()
                    body: dict[str, Any] = {"orders": [{"id": i, "status": s, "total_cents": t}
                                                       for i, s, t in found]}
                else:
                    found = conn.execute("SELECT id, email, name FROM users WHERE id = %s",
                                         (key["user_id"],)).fetchall()
                    body = {"users": [{"id": i, "email": e, "name": n} for i, e, n in found]}
                conn.execute("UPDATE api_keys SET last_used_at = now() WHERE id = %s", (key["id"],))
                key_requests.labels(label, "200").inc()
                if PII_FIELDS & set(fields):
                    pii_requests.labels(label).inc()
                audit(conn, key, operation, 200, ip, fields, len(found), t0)
                return JSONResponse({**body, "tier": key["tier"], "remaining": max(0, limit - used)})
        except psycopg.Error:
            query_errors.inc()
            return JSONResponse({"error": "database unavailable"}, status_code=503)
        finally:
            db_active.dec()

    @app.get("/api/orders")
    def orders(request: Request) -> JSONResponse:
        return api(request, "orders")

    @app.get("/api/profile")
    def profile(request: Request) -> JSONResponse:
        return api(request, "profile")

    @app.post("/admin/auth-check")
    def auth_check(body: AuthCheck) -> JSONResponse:
        if not re.fullmatch(r"[0-9a-f]{64}", body.key_hash):
            return JSONResponse({"error": "key_hash must be 64 lowercase hex digits"}, status_code=422)
        try:
            with psycopg.connect(settings.dsn, connect_timeout=max(1, int(settings.check_timeout))) as conn:
                key, why = lookup(conn, body.key_hash)
        except psycopg.Error:
            return JSONResponse({"error": "database unavailable"}, status_code=503)
        if key is None or why:
            return JSONResponse({"status": 401, "reason": why}, status_code=401)
        return JSONResponse({"status": 200, "key_prefix": key["prefix"]})

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m demo.service", description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help='"none": run without a cache')
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--default-rpm", type=int, default=60)
    parser.add_argument("--limits", type=Path, help="a TOML file: default_rpm = N and a [tiers] table of "
                        "per-tier limits (what a permanent rate-limit change edits)")
    parser.add_argument("--key-prefix", default="", help="prefix of this service's Redis keys")
    parser.add_argument("--fault", default="none", choices=FAULTS, help="start with this fault switched on")
    args = parser.parse_args(argv)
    redis_url = None if args.redis == "none" else args.redis
    limits = tomllib.loads(args.limits.read_text()) if args.limits else {}
    app = create_app(ServiceSettings(dsn=args.dsn, redis_url=redis_url,
                                     default_rpm=limits.get("default_rpm", args.default_rpm),
                                     tier_rpm=limits.get("tiers", {}), key_prefix=args.key_prefix, fault=args.fault))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
