"""Read figures from Prometheus's HTTP API: the error rate a restart must bring back
under its threshold (runbook 1, "error rate returns to baseline").

Why a module of its own: the restart runbook, `config check` and (later) the SLO report
all ask Prometheus; one place knows the API's shapes and turns each way it can go
wrong (unreachable, bad PromQL, no data) into one clear error.

    >>> prom = PrometheusConfig(url="http://127.0.0.1:9090")
    >>> query_value(prom, "vector(0.25)")
    0.25
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.errors import RunbookError

# The share of the service's requests answered 5xx over the last minute. `or vector(0)`
# because the 5xx series only exists once a 5xx has happened. "$job" becomes the
# service's Prometheus job: its `prometheus_job`, or else its name.
DEFAULT_ERROR_RATE_QUERY = (
    '(sum(rate(fraiseql_http_requests_total{job="$job",status=~"5.."}[1m])) or vector(0))'
    ' / sum(rate(fraiseql_http_requests_total{job="$job"}[1m]))'
)
# The service's P95 query latency over the last 5 minutes, in seconds (NaN without traffic).
DEFAULT_LATENCY_QUERY = (
    'histogram_quantile(0.95, sum by (le) (rate(fraiseql_query_duration_seconds_bucket{job="$job"}[5m])))'
)


class PrometheusConfig(BaseModel):
    """`[prometheus]`: where the Prometheus HTTP API answers."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="e.g. http://127.0.0.1:9090")
    timeout: float = Field(5.0, gt=0, description="seconds for each query")

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        if httpx.URL(url).userinfo:  # it would show in every message that names the URL
            raise ValueError("must not hold a user or password (authentication is not supported)")
        return url.rstrip("/")


class MetricsUnavailable(RunbookError):
    """Prometheus could not answer a query: unreachable, bad PromQL, or no data."""


class PrometheusDown(MetricsUnavailable):
    """Unreachable, too slow, or answering 5xx: a later attempt may fare better."""


def _api(prom: PrometheusConfig, path: str, params: dict[str, str], promql: str, retries: int = 0) -> dict:
    """The `data` of one API call; every way it can fail is a MetricsUnavailable. With
    `retries`, a Prometheus that is down is asked again (tasks.retries' delays)."""
    from tasks.retries import RETRY_DELAYS

    for attempt in range(retries):
        try:
            return _call(prom, path, params, promql)
        except PrometheusDown:
            time.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
    return _call(prom, path, params, promql)


def _call(prom: PrometheusConfig, path: str, params: dict[str, str], promql: str) -> dict:
    try:
        response = httpx.get(f"{prom.url}/api/v1/{path}", params=params, timeout=prom.timeout)
    except httpx.TimeoutException:
        raise PrometheusDown(f"Prometheus at {prom.url} did not answer within {prom.timeout:g}s") from None
    except httpx.HTTPError as exc:
        raise PrometheusDown(f"Prometheus at {prom.url} is unreachable: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 500:
        reason = body.get("error") if isinstance(body, dict) else None
        raise PrometheusDown(f"Prometheus at {prom.url} answered HTTP {response.status_code}"
                             + (f": {reason}" if reason else ""))
    if not isinstance(body, dict) or body.get("status") not in ("success", "error"):
        raise MetricsUnavailable(f"Prometheus at {prom.url} answered HTTP {response.status_code} "
                                 "with something else than its API's JSON (is that URL Prometheus?)")
    if body["status"] == "error":
        raise MetricsUnavailable(f"Prometheus rejected the query {promql!r}: "
                                 f"{body.get('errorType', 'error')}: {body.get('error', response.status_code)}")
    return body.get("data") if isinstance(body.get("data"), dict) else {}


def query_value(prom: PrometheusConfig, promql: str) -> float | None:
    """The one number an instant query returns; None when it is NaN (e.g. 0/0: no
    traffic). A query that returns no series or several is an error: it cannot be
    compared with a threshold."""
    data = _api(prom, "query", {"query": promql}, promql)
    kind, result = data.get("resultType"), data.get("result")
    if kind == "vector" and result == []:
        raise MetricsUnavailable(f"the query {promql!r} returned no data (is the service scraped, "
                                 "under that job name?)")
    if kind == "vector" and isinstance(result, list) and len(result) > 1:
        raise MetricsUnavailable(f"the query {promql!r} returned {len(result)} series; it must return "
                                 "one number (use sum())")
    try:
        sample = result if kind == "scalar" else result[0]["value"] if kind == "vector" else None
        number = float(sample[1])  # [timestamp, "value"]
    except (TypeError, KeyError, IndexError, ValueError):
        raise MetricsUnavailable(f"the query {promql!r} returned a {kind or 'malformed'} result, "
                                 "not one number") from None
    return None if math.isnan(number) else number


def _number(text: object) -> float:
    """A sample value as Prometheus writes it: a string, "NaN", "+Inf" and "-Inf" included."""
    return float(str(text))


def query_at(prom: PrometheusConfig, promql: str, at: datetime, retries: int = 3) -> list[tuple[dict[str, str], float]]:
    """Every (labels, value) an instant query returns at `at` (a scalar has no labels).
    No series is an empty list. A Prometheus that is down is asked again."""
    data = _api(prom, "query", {"query": promql, "time": f"{at.timestamp():.3f}"}, promql, retries=retries)
    kind, result = data.get("resultType"), data.get("result")
    try:
        if kind == "scalar":
            return [({}, _number(result[1]))]  # type: ignore[index]
        if kind == "vector" and isinstance(result, list):
            return [(dict(r.get("metric", {})), _number(r["value"][1])) for r in result]
    except (TypeError, KeyError, IndexError, ValueError):
        pass
    raise MetricsUnavailable(f"the query {promql!r} returned a {kind or 'malformed'} result, not numbers")


def raw_samples(prom: PrometheusConfig, selector: str, start: datetime, end: datetime,
                chunk: timedelta = timedelta(days=1), retries: int = 3) -> list[list[tuple[float, float]]]:
    """The samples a series selector stored between `start` and `end`, as scraped (no
    step, no lookback), per series: read a day at a time as `selector[1d]`."""
    merged: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    t = start
    while t < end:
        stop = min(t + chunk, end)
        seconds = int(round((stop - t).total_seconds()))
        promql = f"{selector}[{seconds}s]"
        data = _api(prom, "query", {"query": promql, "time": f"{stop.timestamp():.3f}"}, promql, retries=retries)
        if data.get("resultType") != "matrix" or not isinstance(data.get("result"), list):
            raise MetricsUnavailable(f"{selector!r} is not a series selector (its range query returned "
                                     f"{data.get('resultType') or 'nothing'})")
        for s in data["result"]:
            key = tuple(sorted(s.get("metric", {}).items()))
            rows = merged.setdefault(key, [])
            rows += [(float(ts), _number(v)) for ts, v in s.get("values", []) if not rows or float(ts) > rows[-1][0]]
        t = stop
    return list(merged.values())


class Series(BaseModel):
    """One series of a range query: its labels and its (unix time, value) samples."""

    labels: dict[str, str]
    samples: list[tuple[float, float]]


def query_range(prom: PrometheusConfig, promql: str, start: datetime, end: datetime,
                points: int = 1000) -> list[Series]:
    """Every series of `promql` from `start` to `end`, about `points` samples each
    (Prometheus' step, at least 1 s). No series at all is an empty list, not an error:
    an alert's expression is empty once it stops firing."""
    step = max(1.0, (end - start).total_seconds() / points)
    data = _api(prom, "query_range", {"query": promql, "start": f"{start.timestamp():.3f}",
                                      "end": f"{end.timestamp():.3f}", "step": f"{step:g}"}, promql)
    if data.get("resultType") != "matrix" or not isinstance(data.get("result"), list):
        raise MetricsUnavailable(f"the range query {promql!r} returned a {data.get('resultType') or 'malformed'} "
                                 "result, not a matrix")
    try:
        return [Series(labels=s.get("metric", {}), samples=[(float(t), float(v)) for t, v in s.get("values", [])])
                for s in data["result"]]
    except (TypeError, ValueError) as exc:
        raise MetricsUnavailable(f"the range query {promql!r} returned samples that are not numbers: {exc}") from None


def expression_of(generator_url: str) -> str | None:
    """The PromQL of an alert, from the `generatorURL` Prometheus puts on it
    (`.../graph?g0.expr=...`); None when the URL carries none."""
    try:
        values = parse_qs(urlsplit(generator_url).query).get("g0.expr")
    except ValueError:
        return None
    return values[0] if values and values[0].strip() else None


@dataclass
class ErrorRate:
    """The service's error rate in Prometheus, against its threshold."""

    prom: PrometheusConfig
    promql: str
    threshold: float

    def read(self) -> float | None:
        """The ratio now; None when there was no traffic to measure (0/0)."""
        rate = query_value(self.prom, self.promql)
        if rate is not None and not 0 <= rate <= 1:
            raise MetricsUnavailable(f"the error-rate query {self.promql!r} returned {rate}; "
                                     "it must give a share from 0 to 1")
        return rate

    def too_high(self, rate: float | None) -> bool:
        return rate is not None and rate > self.threshold

    def describe(self, rate: float | None) -> str:
        return f"{percent(rate)} (threshold {self.threshold:.2%})"


def percent(rate: float | None) -> str:
    return "no traffic" if rate is None else f"{rate:.2%}"
