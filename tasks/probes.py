"""Health probes of a target service: /health, /ready and /live, with the semantics and
JSON shapes of the reference system (Kubernetes probe style). A probe never raises for
a sick service: it returns a typed result saying what it saw; `wait_until_ready` turns
"not ready by the deadline" into one clear error.

    >>> result = probe("http://127.0.0.1:8000", ProbeKind.READY, timeout=2)
    >>> result.ok, result.status_code, result.reason
    (False, 503, 'Database unavailable')
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from enum import Enum
from typing import Any

import httpx
from pydantic import BaseModel, Field

from tasks.errors import RunbookError


class ProbeKind(str, Enum):
    HEALTH = "health"
    READY = "ready"
    LIVE = "live"


class ProbeResult(BaseModel):
    """What one probe saw."""

    kind: ProbeKind
    url: str
    ok: bool
    status_code: int | None = None
    latency_ms: float
    reason: str | None = None
    body: dict[str, Any] | None = None
    checked_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


class ServiceNotReady(RunbookError):
    """The service did not become ready before the deadline."""


# The field of each endpoint's JSON that says "all is well", and its good value.
_VERDICT = {ProbeKind.HEALTH: ("status", "healthy"), ProbeKind.READY: ("ready", True),
            ProbeKind.LIVE: ("alive", True)}


def probe(base_url: str, kind: ProbeKind, timeout: float = 2.0) -> ProbeResult:
    """GET <base_url>/<kind> once; connecting and each read are bounded by `timeout`."""
    url = f"{base_url.rstrip('/')}/{kind.value}"
    started = time.monotonic()

    def result(ok: bool, **fields: Any) -> ProbeResult:
        return ProbeResult(kind=kind, url=url, ok=ok, latency_ms=(time.monotonic() - started) * 1000, **fields)

    try:
        response = httpx.get(url, timeout=httpx.Timeout(timeout), follow_redirects=False)
    except httpx.TimeoutException:
        return result(False, reason=f"no answer within {timeout:g}s")
    except httpx.ConnectError as exc:
        return result(False, reason=f"cannot connect: {_short(exc)}")
    except httpx.HTTPError as exc:
        return result(False, reason=f"{type(exc).__name__}: {_short(exc)}")
    try:
        body = response.json()
        body = body if isinstance(body, dict) else None
    except ValueError:
        body = None
    field, good = _VERDICT[kind]
    healthy = response.status_code == 200 and body is not None and body.get(field) == good
    reason = None
    if not healthy:
        said = (body or {}).get("reason") or (body or {}).get("error")
        reason = str(said) if said else (f"HTTP {response.status_code}" if response.status_code != 200
                                         else f"answered without {field}={good!r}")
    return result(healthy, status_code=response.status_code, reason=reason, body=body)


def probe_all(base_url: str, timeout: float) -> list[ProbeResult]:
    """/health, /ready and /live, one after the other."""
    return [probe(base_url, kind, timeout) for kind in ProbeKind]


def failures(results: list[ProbeResult]) -> list[str]:
    """What failed, as `/<probe>: <reason>` (empty when all passed)."""
    return [f"/{p.kind.value}: {p.reason}" for p in results if not p.ok]


def wait_until_ready(base_url: str, deadline_seconds: float, interval: float = 1.0,
                     timeout: float = 2.0) -> ProbeResult:
    """Poll /ready until it passes; past the deadline, fail with the last thing it said."""
    end = time.monotonic() + deadline_seconds
    attempts = 0
    while True:
        attempts += 1
        last = probe(base_url, ProbeKind.READY, timeout=min(timeout, max(end - time.monotonic(), 0.1)))
        if last.ok:
            return last
        if time.monotonic() + interval > end:
            raise ServiceNotReady(f"{base_url} not ready after {deadline_seconds:g}s "
                                  f"({attempts} probes); last: {last.reason}")
        time.sleep(interval)


def _short(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
