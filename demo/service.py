"""The demo target service: a small API shaped like the reference system, for the
runbooks to probe, restart and drill against.

Endpoints (reference: "Health Checks" in 002):
  GET /health   {"status": "healthy", "timestamp", "uptime_seconds"}
  GET /ready    {"ready", "database_connected", "cache_available", "reason"}; 503 when not
  GET /live     {"alive", "pid", "response_time_ms"}
  GET /metrics  Prometheus text: fraiseql_http_requests_total{status},
                fraiseql_query_duration_seconds, fraiseql_query_errors_total,
                fraiseql_db_connections_active, fraiseql_uptime_seconds
  GET /api/orders        needs `Authorization: Bearer <api key>`; only key hashes are
                         stored; 401 for unknown or revoked keys; 429 over the tier's limit
  POST /admin/fault      {"mode": "none" | "hang" | "error" | "api-error" | "slow" | "crash"}
                         (drills; "api-error" fails only /api/, a bug the probes do not see);
                         SIGUSR1 switches to "hang", SIGUSR2 back to "none"

    python -m demo.service --dsn DSN [--redis redis://127.0.0.1:6379/0] [--port 8000]
                           [--fault MODE]   (start faulty: a bad release a restart does not cure)
uvicorn handles SIGTERM gracefully: it stops accepting and lets in-flight requests finish.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import sys
import time
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
    default_rpm: int = 60  # when no rate_limit:tier:<tier>:requests_per_minute is set
    slow_seconds: float = 2.0
    check_timeout: float = 2.0
    key_prefix: str = ""  # namespaces this service's Redis keys (tests, several services)
    fault: str = "none"  # the fault it starts with


class Fault(BaseModel):
    mode: str


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

    @app.get("/api/orders")
    def orders(request: Request) -> JSONResponse:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return JSONResponse({"error": "missing or malformed API key"}, status_code=401)
        digest = hashlib.sha256(key.strip().encode()).hexdigest()
        with query_seconds.time():
            try:
                rows = query("SELECT id, user_id, tier FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL",
                             (digest,))
            except psycopg.Error:
                query_errors.inc()
                return JSONResponse({"error": "database unavailable"}, status_code=503)
        if not rows:
            return JSONResponse({"error": "unknown or revoked API key"}, status_code=401)
        key_id, user_id, tier = rows[0]
        limit, used = settings.default_rpm, 0
        try:
            if cache is not None:  # without a cache (demo without Redis) nothing is limited
                ns = settings.key_prefix
                limit = int(cache.get(f"{ns}rate_limit:tier:{tier}:requests_per_minute") or settings.default_rpm)
                window = f"{ns}rate:{key_id}:{int(time.time() // 60)}"
                used = cache.incr(window)
                cache.expire(window, 120)
        except redis.RedisError:
            return JSONResponse({"error": "rate limiter unavailable"}, status_code=503)
        if used > limit:
            return JSONResponse({"error": f"rate limit of {limit}/min for tier {tier} exceeded"},
                                status_code=429, headers={"Retry-After": "60"})
        with query_seconds.time():
            found = query("SELECT id, status, total_cents FROM orders WHERE user_id = %s ORDER BY id LIMIT 10",
                          (user_id,))
        return JSONResponse({"orders": [{"id": i, "status": s, "total_cents": t} for i, s, t in found],
                             "tier": tier, "remaining": max(0, limit - used)})

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m demo.service", description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help='"none": run without a cache')
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--default-rpm", type=int, default=60)
    parser.add_argument("--key-prefix", default="", help="prefix of this service's Redis keys")
    parser.add_argument("--fault", default="none", choices=FAULTS, help="start with this fault switched on")
    args = parser.parse_args(argv)
    redis_url = None if args.redis == "none" else args.redis
    app = create_app(ServiceSettings(dsn=args.dsn, redis_url=redis_url, default_rpm=args.default_rpm,
                                     key_prefix=args.key_prefix, fault=args.fault))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
