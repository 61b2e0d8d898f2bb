"""Service level objectives and the SLA: a service's month measured from Prometheus.

Request-weighted from counters: one instant query of `increase(...[<the window's
length>])` at the window's end per figure, never an average of ratios. Time-based
uptime (the reference's "uptime minutes / minutes in month") and data gaps come from the
raw samples of two series, so a gap is measured to the second and never counted as up.
"""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.prometheus import MetricsUnavailable, PrometheusConfig, query_at, raw_samples

GAP_FACTOR = 2.5  # a pause between samples longer than this many scrape intervals is a gap


class CreditTier(BaseModel):
    model_config = ConfigDict(extra="forbid")

    below: float = Field(gt=0, le=1, description="availability under this share ...")
    credit_percent: float = Field(ge=0, le=100, description="... earns this service credit")


class SloSpec(BaseModel):
    """`[slo.<service>]`: a service's objectives, its SLA and where Prometheus keeps its
    numbers. The defaults are the reference's targets and the demo service's metrics;
    `$job` is the service's Prometheus job, `$service` its name, `$window` the range."""

    model_config = ConfigDict(extra="forbid")

    availability: float = Field(0.999, gt=0, lt=1, description="SLO: share of requests not answered 5xx")
    latency_threshold_seconds: float = Field(0.1, gt=0, description="SLO: a request under this is fast")
    latency_target: float = Field(0.95, gt=0, lt=1, description="SLO: share of requests that must be fast "
                                  "(0.95 with 100 ms: P95 under 100 ms)")
    error_rate: float = Field(0.001, gt=0, lt=1, description="SLO: share of requests answered 5xx at most")
    sla_availability: float = Field(0.995, gt=0, lt=1)
    sla_latency_seconds: float = Field(0.15, gt=0, description="SLA: the P95 must stay under this")
    sla_error_rate: float = Field(0.002, gt=0, lt=1)
    credits: list[CreditTier] = Field(default_factory=lambda: [
        CreditTier(below=0.995, credit_percent=10), CreditTier(below=0.99, credit_percent=25),
        CreditTier(below=0.98, credit_percent=50)])
    availability_basis: str = Field("requests", pattern="^(requests|uptime)$", description="what the SLA's "
                                    "availability and credits are judged on: requests, or probe uptime")
    requests_query: str = 'sum(increase(fraiseql_http_requests_total{job="$job"}[$window]))'
    errors_query: str = 'sum(increase(fraiseql_http_requests_total{job="$job",status=~"5.."}[$window]))'
    latency_buckets_query: str = 'sum by (le) (increase(fraiseql_query_duration_seconds_bucket{job="$job"}[$window]))'
    scrape_series: str = Field('up{job="$job"}', description="a series selector: where it has no samples, "
                               "nothing was measured (a gap)")
    uptime_series: str = Field('runbooks_probe_success{service="$service",probe="health"}',
                               description="a series selector of 1 (up) and 0 (down): the health-check flow's")
    timezone: str = Field("UTC", description="the report's months and days")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name, e.g. Europe/Paris)") from None
        return value

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def credit(self, availability: float | None) -> float:
        if availability is None:
            return 0.0
        return max((t.credit_percent for t in self.credits if availability < t.below), default=0.0)


def month_bounds(month: str, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """[first midnight, next month's first midnight) in the zone, in UTC (so their
    difference is real time: 743 h, 744 h or 745 h across a DST change)."""
    year, number = (int(x) for x in month.split("-"))
    start = datetime(year, number, 1, tzinfo=zone)
    end = datetime(year + number // 12, number % 12 + 1, 1, tzinfo=zone)
    return start.astimezone(timezone.utc), end.astimezone(timezone.utc)


def days_of(start: datetime, end: datetime, zone: ZoneInfo) -> list[tuple[date, datetime, datetime]]:
    """The zone's days from `start` to `end`, each as (date, start, end) in UTC (23 or 25
    hours across a DST change)."""
    out, day = [], start.astimezone(zone).date()
    while True:
        a = datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(timezone.utc)
        if a >= end:
            return out
        nxt = day + timedelta(days=1)
        b = datetime(nxt.year, nxt.month, nxt.day, tzinfo=zone).astimezone(timezone.utc)
        out.append((day, a, min(b, end)))
        day = nxt


class Window(BaseModel):
    """One stretch of time (a month, a day) measured."""

    start: datetime
    end: datetime
    requests: float | None = None  # None: no series at all (no traffic, or not scraped)
    errors: float | None = None
    fast: float | None = None  # requests under the latency threshold (interpolated in its bucket)
    p95_seconds: float | None = None
    sla_fast: float | None = None  # requests under the SLA's latency
    down_seconds: float = 0.0  # the uptime series said 0
    up_seconds: float = 0.0
    gaps: list[tuple[datetime, float]] = []  # (start, seconds) without scrape samples

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()

    @property
    def gap_seconds(self) -> float:
        return sum(s for _, s in self.gaps)

    @property
    def measured_share(self) -> float:
        return max(0.0, 1 - self.gap_seconds / self.seconds) if self.seconds else 0.0

    @property
    def availability(self) -> float | None:
        if not self.requests:
            return None
        return 1 - (self.errors or 0) / self.requests

    @property
    def error_rate(self) -> float | None:
        return None if not self.requests else (self.errors or 0) / self.requests

    @property
    def latency_sli(self) -> float | None:
        return None if not self.requests or self.fast is None else self.fast / self.requests

    @property
    def uptime(self) -> float | None:
        """Up time over the time the uptime series measured; None when it never did."""
        measured = self.up_seconds + self.down_seconds
        return None if measured <= 0 else self.up_seconds / measured


def measure(prom: PrometheusConfig, spec: SloSpec, job: str, service: str, start: datetime, end: datetime,
            samples: dict[str, list[tuple[float, float]]]) -> Window:
    """The window's figures. `samples` are the month's raw scrape and uptime samples
    (`month_samples`, read once and cut per day)."""
    window = f"{int(round((end - start).total_seconds()))}s"

    def render(q: str) -> str:
        return q.replace("$job", job).replace("$service", service).replace("$window", window)

    w = Window(start=start, end=end)
    w.requests = _one(query_at(prom, render(spec.requests_query), end))
    if w.requests:
        w.errors = _one(query_at(prom, render(spec.errors_query), end)) or 0.0
        buckets = sorted(((float(labels.get("le", "nan")), value) for labels, value in
                          query_at(prom, render(spec.latency_buckets_query), end)), key=lambda b: b[0])
        w.fast = under(buckets, spec.latency_threshold_seconds)
        w.sla_fast = under(buckets, spec.sla_latency_seconds)
        w.p95_seconds = quantile(buckets, 0.95)
    scrape = [s for s in samples["scrape"] if start.timestamp() <= s[0] <= end.timestamp()]
    w.gaps = gaps(scrape, start.timestamp(), end.timestamp())
    uptime = [s for s in samples["uptime"] if start.timestamp() <= s[0] <= end.timestamp()]
    w.up_seconds, w.down_seconds = up_down(uptime, end.timestamp())
    return w


def month_samples(prom: PrometheusConfig, spec: SloSpec, job: str, service: str, start: datetime,
                  end: datetime) -> dict[str, list[tuple[float, float]]]:
    out = {}
    for name, selector in (("scrape", spec.scrape_series), ("uptime", spec.uptime_series)):
        series = raw_samples(prom, selector.replace("$job", job).replace("$service", service), start, end)
        out[name] = sorted(s for one in series for s in one)  # several series (instances) merge
    return out


def _one(result: list[tuple[dict[str, str], float]]) -> float | None:
    if not result:
        return None
    if len(result) > 1:
        raise MetricsUnavailable(f"a query returned {len(result)} series where one was expected (use sum())")
    value = result[0][1]
    return None if math.isnan(value) else value


def interval(samples: list[tuple[float, float]]) -> float:
    """The scrape interval: the median distance between samples (60 s when unknown)."""
    steps = sorted(b[0] - a[0] for a, b in zip(samples, samples[1:]) if b[0] > a[0])
    return steps[len(steps) // 2] if steps else 60.0


def gaps(samples: list[tuple[float, float]], start: float, end: float) -> list[tuple[datetime, float]]:
    """Stretches without samples longer than GAP_FACTOR scrape intervals, from the last
    sample before to the first after (the window's edges count as samples' ends)."""
    if not samples:
        return [(datetime.fromtimestamp(start, timezone.utc), end - start)]
    step = interval(samples)
    times = [start, *(t for t, _ in samples), end]
    out = []
    for a, b in zip(times, times[1:]):
        if b - a > GAP_FACTOR * step:
            out.append((datetime.fromtimestamp(a, timezone.utc), b - a))
    return out


def up_down(samples: list[tuple[float, float]], end: float) -> tuple[float, float]:
    """Seconds up and down: each sample holds until the next one, unless that is a gap."""
    if not samples:
        return 0.0, 0.0
    step = interval(samples)
    up = down = 0.0
    for (t, v), nxt in zip(samples, [*samples[1:], (min(end, samples[-1][0] + step), 0.0)]):
        span = nxt[0] - t
        if span <= 0 or span > GAP_FACTOR * step:
            continue
        if v >= 1:
            up += span
        else:
            down += span
    return up, down


def under(buckets: list[tuple[float, float]], threshold: float) -> float | None:
    """How many observations were at most `threshold`, interpolated linearly inside its
    bucket as histogram_quantile does."""
    if not buckets:
        return None
    previous_le, previous_count = 0.0, 0.0
    for le, count in buckets:
        if threshold <= le:
            if math.isinf(le):
                return previous_count
            share = (threshold - previous_le) / (le - previous_le) if le > previous_le else 1.0
            return previous_count + (count - previous_count) * share
        previous_le, previous_count = le, count
    return previous_count


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """histogram_quantile over cumulative buckets."""
    if not buckets or not buckets[-1][1]:
        return None
    rank = q * buckets[-1][1]
    previous_le, previous_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return previous_le
            if count == previous_count:
                return le
            return previous_le + (le - previous_le) * (rank - previous_count) / (count - previous_count)
        previous_le, previous_count = le, count
    return previous_le


def chart(spec: SloSpec, month: str, days: list[tuple[date, Window]], budget_requests: float | None) -> bytes:
    """A PNG: daily availability and P95 against their targets, and the error budget
    left through the month. Days without data are left out of the lines (not drawn as
    good); days with gaps are shaded."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    x = [d for d, _ in days]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 8.5), sharex=True, dpi=90)
    avail = [w.availability * 100 if w.availability is not None else float("nan") for _, w in days]
    top.plot(x, avail, marker="o", ms=3, label="availability (requests)")
    top.axhline(spec.availability * 100, color="green", ls="--", label=f"SLO {spec.availability:.2%}")
    top.axhline(spec.sla_availability * 100, color="red", ls=":", label=f"SLA {spec.sla_availability:.2%}")
    top.set_ylabel("%")
    top.set_title(f"{month}: daily availability")
    p95 = [w.p95_seconds * 1000 if w.p95_seconds is not None else float("nan") for _, w in days]
    middle.plot(x, p95, marker="o", ms=3, color="purple", label="P95")
    middle.axhline(spec.latency_threshold_seconds * 1000, color="green", ls="--", label="SLO threshold")
    middle.axhline(spec.sla_latency_seconds * 1000, color="red", ls=":", label="SLA P95")
    middle.set_ylabel("ms")
    middle.set_title("daily P95 latency")
    left, spent = [], 0.0
    for _, w in days:
        spent += w.errors or 0
        left.append(100 * (1 - spent / budget_requests) if budget_requests else float("nan"))
    bottom.plot(x, left, color="darkorange", label="error budget left")
    bottom.axhline(0, color="red", lw=0.8)
    bottom.set_ylabel("% of the month's budget")
    bottom.set_title("error budget burn-down")
    for axis in (top, middle, bottom):
        for d, w in days:
            if w.gaps:
                axis.axvspan(d, d + timedelta(days=1), color="grey", alpha=0.25)
        axis.legend(loc="lower left", fontsize=8)
        axis.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


# Multiwindow, multi-burn-rate alerts (the Google SRE workbook's table): a burn rate of
# 14.4 spends 2 % of a 30-day budget in an hour; each alert needs its long and its short
# window over the rate, so it fires fast and stops soon after the burning does.
BURN_ALERTS = (
    ("SLOErrorBudgetBurnFast", "critical", ((14.4, "1h", "5m"), (6, "6h", "30m")),
     "page: at this rate the month's error budget is gone in days"),
    ("SLOErrorBudgetBurnSlow", "warning", ((3, "1d", "2h"), (1, "3d", "6h")),
     "ticket: the month's error budget runs out before the month does"),
)
WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")


def burn_rate_rules(specs: dict[str, SloSpec], jobs: dict[str, str]) -> dict:
    """Prometheus rule groups for every service's availability SLO: the error ratio
    recorded over each window, and the two burn-rate alerts."""
    groups = []
    for service, spec in sorted(specs.items()):
        job, budget = jobs.get(service, service), 1 - spec.availability
        rules: list[dict] = []
        for window in WINDOWS:
            def render(q: str) -> str:
                return q.replace("$job", job).replace("$service", service).replace("$window", window)
            rules.append({"record": f"slo:error_ratio:{window}",
                          "expr": f"({render(spec.errors_query)} or vector(0)) / {render(spec.requests_query)}",
                          "labels": {"service": service}})
        for name, severity, pairs, what in BURN_ALERTS:
            sel = f'{{service="{service}"}}'
            expr = " or ".join(f"(slo:error_ratio:{long}{sel} > {factor:g} * {budget:g} and "
                               f"slo:error_ratio:{short}{sel} > {factor:g} * {budget:g})"
                               for factor, long, short in pairs)
            rules.append({"alert": name, "expr": expr, "labels": {"severity": severity, "service": service},
                          "annotations": {"summary": f"{service}: errors at {{{{ $value | humanizePercentage }}}} of "
                                                     f"requests burn its {spec.availability:.2%} SLO's budget ({what})"}})
        groups.append({"name": f"slo-{service}", "rules": rules})
    return {"groups": groups}
