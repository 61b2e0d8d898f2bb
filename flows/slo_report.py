"""The monthly SLO and SLA report of a service: what the month's requests and probes
say against its objectives, the error budget, the SLA commitments and the credit owed."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from flows._common import announce
from tasks import slo
from tasks.config import load_settings
from tasks.errors import ConfigError
from tasks.notify import Severity
from tasks.report import RunReport
from tasks.slo import SloSpec, Window


class SloResult(BaseModel):
    service: str
    month: str
    hours: float
    measured_share: float
    gaps: list[tuple[datetime, float]]
    requests: float | None
    availability: float | None
    uptime: float | None
    error_rate: float | None
    latency_sli: float | None
    p95_seconds: float | None
    budget_requests: float | None
    budget_used_requests: float | None
    budget_minutes: float
    budget_used_minutes: float
    burn_rate: float | None
    slo_met: dict[str, bool | None]
    sla_met: dict[str, bool | None]
    credit_percent: float
    worst_days: list[str]
    report_file: str


def previous_month(zone: slo.ZoneInfo) -> str:
    first = datetime.now(zone).replace(day=1)
    last = first - timedelta(days=1)
    return f"{last:%Y-%m}"


@flow(name="slo-report", log_prints=True)
def slo_report(service: str, month: str | None = None) -> SloResult:
    """Report a service's month against its SLOs and SLA (the monthly report).

    Use: on the 1st of each month, for the month before; by hand for any month Prometheus
    still holds.
    Steps:
      1. read the month's raw scrape and uptime samples (gaps to the second);
      2. measure the month and each day, request-weighted from counters (one
         `increase` over the whole window at its end, never an average of ratios):
         availability, error rate, latency SLI and P95; and the probes' uptime;
      3. error budget (requests and minutes), burn rate, SLO and SLA met or breached,
         the credit tier, the worst days;
      4. publish the report (markdown with its chart embedded, versioned per service),
         the daily table, a JSON file and the chart's PNG in the report directory, and
         a notice.
    Data gaps are reported with their length and never count as good.

    Args:
        service: The service (a [slo.<name>] of runbooks.toml).
        month: YYYY-MM; empty: the previous calendar month in the report's zone.
    """
    settings = load_settings()
    if service not in settings.slo:
        known = ", ".join(sorted(settings.slo)) or "none configured"
        raise ConfigError(f"no [slo.{service}] in runbooks.toml (configured: {known})")
    if settings.prometheus is None:
        raise ConfigError("the SLO report reads Prometheus: add a [prometheus] section")
    spec = settings.slo[service]
    month = month or previous_month(spec.zone)
    try:
        start, end = slo.month_bounds(month, spec.zone)
    except ValueError:
        raise ConfigError(f"month must be YYYY-MM (got {month!r})") from None
    if end > datetime.now(timezone.utc):
        raise ConfigError(f"{month} has not ended yet (it ends {end:%Y-%m-%d %H:%M} UTC): a month is reported "
                          "once it is over")
    job = settings.service(service).prometheus_job or service
    with RunReport("SLO report run", f"{service} {month}") as run:
        with run.step("read the month's samples") as step:
            samples = slo.month_samples(settings.prometheus, spec, job, service, start, end)
            step.detail = f"{len(samples['scrape'])} scrape and {len(samples['uptime'])} uptime samples"
        with run.step("measure the month and each day") as step:
            whole = slo.measure(settings.prometheus, spec, job, service, start, end, samples)
            days = [(d, slo.measure(settings.prometheus, spec, job, service, a, b, samples))
                    for d, a, b in slo.days_of(start, end, spec.zone)]
            step.detail = f"{len(days)} days, {whole.measured_share:.2%} of the month measured"
        result = _result(spec, service, month, whole, days, settings.slo_report_dir)
        with run.step("publish the report"):
            png = slo.chart(spec, month, days, result.budget_requests)
            rows = [_row(d, w) for d, w in days]
            markdown = render(spec, result, rows, png)
            create_markdown_artifact(markdown=markdown, key=f"slo-report-{service}",
                                     description=f"SLO report of {service} for {month}")
            create_table_artifact(table=rows, key=f"slo-days-{service}",
                                  description=f"{service}, {month}, day by day")
            path = settings.slo_report_dir / f"{service}-{month}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(result.model_dump_json(indent=2))
            path.with_suffix(".png").write_bytes(png)
        run.figure("Availability", _pct(result.availability))
        run.figure("SLA", "met" if all(v is not False for v in result.sla_met.values()) else "breached")
        run.figure("Credit", f"{result.credit_percent:g} %")
        announce(settings, run, Severity.INFO if result.credit_percent == 0 else Severity.HIGH,
                 f"{service} in {month}: availability {_pct(result.availability)}, P95 "
                 f"{_ms(result.p95_seconds)}, error rate {_pct(result.error_rate)}; SLA "
                 f"{'met' if all(v is not False for v in result.sla_met.values()) else 'breached'}, credit "
                 f"{result.credit_percent:g} %; {result.measured_share:.2%} of the month measured.")
        run.outcome = "reported"
        return result


def _result(spec: SloSpec, service: str, month: str, w: Window, days: list, report_dir) -> SloResult:
    availability = w.availability if spec.availability_basis == "requests" else w.uptime
    budget_requests = (1 - spec.availability) * w.requests if w.requests else None
    minutes = w.seconds / 60
    down_minutes = w.down_seconds / 60
    ranked = sorted(((d, x.availability) for d, x in days if x.availability is not None), key=lambda t: t[1])
    return SloResult(
        service=service, month=month, hours=w.seconds / 3600, measured_share=w.measured_share, gaps=w.gaps,
        requests=w.requests, availability=w.availability, uptime=w.uptime, error_rate=w.error_rate,
        latency_sli=w.latency_sli, p95_seconds=w.p95_seconds, budget_requests=budget_requests,
        budget_used_requests=w.errors if w.requests else None,
        budget_minutes=(1 - spec.availability) * minutes, budget_used_minutes=down_minutes,
        burn_rate=(w.errors or 0) / budget_requests if budget_requests else None,
        slo_met={"availability": _at_least(availability, spec.availability),
                 "latency": _at_least(w.latency_sli, spec.latency_target),
                 "error rate": _at_most(w.error_rate, spec.error_rate)},
        sla_met={"availability": _at_least(availability, spec.sla_availability),
                 "latency": _at_most(w.p95_seconds, spec.sla_latency_seconds),
                 "error rate": _at_most(w.error_rate, spec.sla_error_rate)},
        credit_percent=spec.credit(availability),
        worst_days=[f"{d:%Y-%m-%d} {_pct(a)}" for d, a in ranked[:3]],
        report_file=str(report_dir / f"{service}-{month}.json"))


def _at_least(value: float | None, target: float) -> bool | None:
    return None if value is None else value >= target


def _at_most(value: float | None, target: float) -> bool | None:
    return None if value is None else value <= target


def _pct(value: float | None) -> str:
    return "no data" if value is None else f"{value:.4%}"


def _ms(seconds: float | None) -> str:
    return "no data" if seconds is None else f"{seconds * 1000:.1f} ms"


def _verdict(met: bool | None) -> str:
    return "no data" if met is None else "met" if met else "**breached**"


def _row(day, w: Window) -> dict:
    return {"day": f"{day:%Y-%m-%d}", "requests": int(w.requests or 0), "availability": _pct(w.availability),
            "error rate": _pct(w.error_rate), "latency SLI": _pct(w.latency_sli), "P95": _ms(w.p95_seconds),
            "uptime": _pct(w.uptime), "gaps": f"{w.gap_seconds / 60:.0f} min"}


def render(spec: SloSpec, r: SloResult, rows: list[dict], png: bytes) -> str:
    gaps = "\n".join(f"- {g:%Y-%m-%d %H:%M} UTC, {s / 3600:.2f} h ({s / 60:.0f} min)" for g, s in r.gaps) or "- none"
    lines = [f"# SLO report: {r.service}, {r.month}", "",
             f"{r.hours:.0f} hours in {spec.timezone}; **{r.measured_share:.2%} measured**"
             + (" (the gaps below are not counted as good)" if r.gaps else ""), "",
             "## Objectives", "", "| | measured | objective | SLO | SLA commitment | SLA |", "|---|---|---|---|---|---|",
             f"| availability ({spec.availability_basis}) | {_pct(r.availability if spec.availability_basis == 'requests' else r.uptime)} "
             f"| ≥ {spec.availability:.2%} | {_verdict(r.slo_met['availability'])} | ≥ {spec.sla_availability:.2%} "
             f"| {_verdict(r.sla_met['availability'])} |",
             f"| latency | SLI {_pct(r.latency_sli)}, P95 {_ms(r.p95_seconds)} | ≥ {spec.latency_target:.0%} under "
             f"{spec.latency_threshold_seconds * 1000:g} ms | {_verdict(r.slo_met['latency'])} | P95 < "
             f"{spec.sla_latency_seconds * 1000:g} ms | {_verdict(r.sla_met['latency'])} |",
             f"| error rate | {_pct(r.error_rate)} | ≤ {spec.error_rate:.2%} | {_verdict(r.slo_met['error rate'])} "
             f"| ≤ {spec.sla_error_rate:.2%} | {_verdict(r.sla_met['error rate'])} |", "",
             f"**Service credit: {r.credit_percent:g} %**", "",
             f"![daily availability, P95 and error budget of {r.service} in {r.month}]"
             f"(data:image/png;base64,{base64.b64encode(png).decode()})", "",
             "## Error budget", "",
             f"- requests: {_n(r.budget_requests)} allowed to fail, {_n(r.budget_used_requests)} failed"
             + (f" (burn rate {r.burn_rate:.2f}: {max(0.0, 1 - r.burn_rate):.0%} left)" if r.burn_rate is not None else ""),
             f"- time: {r.budget_minutes:.1f} minutes allowed down, {r.budget_used_minutes:.1f} down by the probes"
             f" (uptime {_pct(r.uptime)})", "",
             f"Requests in the month: {_n(r.requests)}", "",
             "## Data gaps", "", gaps, "",
             "## Worst days", "", *(f"- {d}" for d in r.worst_days or ["no data"]), "",
             "## Day by day", "", "| day | requests | availability | error rate | latency SLI | P95 | uptime | gaps |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             *(f"| {x['day']} | {x['requests']} | {x['availability']} | {x['error rate']} | {x['latency SLI']} | "
               f"{x['P95']} | {x['uptime']} | {x['gaps']} |" for x in rows)]
    return "\n".join(lines) + "\n"


def _n(value: float | None) -> str:
    return "no data" if value is None else f"{value:,.0f}"

