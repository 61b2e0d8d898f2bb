"""Runbook 1: restart a service that is down or sick, and prove it recovered."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows._common import announce
from tasks.concurrency import exclusive
from tasks.config import load_settings
from tasks.errors import RunbookError
from tasks.notify import Severity
from tasks.probes import ProbeKind, ProbeResult, ServiceNotReady, failures, probe, probe_all, wait_until_ready
from tasks.prometheus import ErrorRate, MetricsUnavailable, percent
from tasks.report import RunReport, first_line
from tasks.service import Controller, ServiceConfig, ServiceError, ServiceStatus

READING_INTERVAL = 5.0  # seconds between error-rate readings while watching
LOG_LINES = 10_000  # the newest lines since the restart, searched for errors


class RestartResult(BaseModel):
    service: str
    restarted: bool
    dry_run: bool = False
    why: str
    seconds_to_ready: float | None = None
    seconds_to_healthy: float | None = None
    probes_before: list[ProbeResult] = []
    error_rate_before: float | None = None
    error_rate_after: float | None = None


@task(name="restart-service", cache_policy=NO_CACHE)
def restart_service(controller: Controller) -> ServiceStatus:
    """Restart through the service's controller (process, systemd, docker, kubernetes)."""
    return controller.restart()


@flow(name="service-restart", log_prints=True)
def service_restart(service: str, force: bool = False, ready_deadline_seconds: float | None = None,
                    watch_seconds: float | None = None, dry_run: bool = False) -> RestartResult:
    """Restart a service that is down or sick, then prove it recovered (runbook 1).

    Use: the service fails its health checks, hangs, or answers with errors.
    Steps:
      1. confirm the problem: probe /health, /ready and /live and, where Prometheus is
         configured, read the error rate; a healthy service is not restarted unless
         `force` (the run says why);
      2. collect its recent logs into the report;
      3. restart it through its controller;
      4. wait until /ready passes (deadline: `ready_deadline_seconds`, default from config);
      5. watch /health stay green for `watch_seconds`; then, where Prometheus is
         configured, the error rate must be back under its threshold;
      6. check that its logs since the restart show no errors (`log_error_pattern`).
    One run per service at a time, confirmation included. `dry_run` confirms and plans,
    restarting nothing.
    A service that never becomes ready fails the run with its logs and a CRITICAL notice.

    Args:
        service: The service target to restart (a name from runbooks.toml).
        force: Restart even when every check passes (e.g. to load new settings).
        ready_deadline_seconds: How long to wait for /ready after the restart, in
            seconds; empty: the service's `ready_deadline_seconds` from runbooks.toml.
        watch_seconds: How long /health must stay green after ready, in seconds;
            empty: the service's `watch_seconds` from runbooks.toml.
        dry_run: Confirm the problem and print the plan; restart nothing.
    """
    settings = load_settings()
    cfg = settings.service(service)
    controller = settings.controller(service)
    errors = settings.error_rate(service)
    deadline = ready_deadline_seconds or cfg.ready_deadline_seconds
    watch = cfg.watch_seconds if watch_seconds is None else watch_seconds

    with RunReport("Service restart", service) as run, exclusive("service", service):
        # The slot covers the confirmation too: a run queued behind another restart
        # probes again once it gets the slot, and finds the service healthy.
        try:
            with run.step("confirm the problem") as step:
                before, sick, rate_before, rate_note = _confirm(cfg.base_url, cfg.probe_timeout, errors, run)
                healthy = "all probes pass" + (f", error rate {rate_note}" if rate_note else "")
                step.detail = "; ".join(sick) or healthy
            if not sick and not force:
                run.outcome = "not restarted (healthy)"
                print(f"{service} is healthy: {healthy}; not restarting it (use force to restart anyway)")
                return RestartResult(service=service, restarted=False, why=f"healthy: {healthy}",
                                     probes_before=before, error_rate_before=rate_before)
            why = "; ".join(sick) if sick else "forced while healthy"
            with run.step("collect recent logs") as step:
                logs = _logs(controller)
                step.detail = f"{len(logs)} lines"
            run.figure("Recent logs (last 20)", " / ".join(logs[-20:]) or "none")
            if dry_run:
                run.outcome = "planned (dry run)"
                print(f"Plan: restart {service} ({why}), wait up to {deadline:g}s for /ready, watch {watch:g}s")
                return RestartResult(service=service, restarted=False, dry_run=True, why=why, probes_before=before,
                                     error_rate_before=rate_before)
            announce(settings, run, Severity.HIGH, f"Restarting {service}: {why}.")
            t0, restarted_at = time.monotonic(), datetime.now(timezone.utc)
            with run.step("restart") as step:
                step.detail = restart_service(controller).detail
            with run.step("wait until ready") as step:
                try:
                    wait_until_ready(cfg.base_url, deadline, interval=1.0, timeout=cfg.probe_timeout)
                except ServiceNotReady:
                    run.figure("Logs after restart (last 20)",
                               " / ".join(_logs(controller, since=restarted_at)[-20:]) or "none")
                    raise
            ready_after = time.monotonic() - t0
            run.figure("Time to ready", f"{ready_after:.1f} s")
            with run.step(f"watch /health for {watch:g}s" + (" and the error rate" if errors else "")) as step:
                rate_after = _watch(cfg.base_url, watch, cfg.probe_timeout, errors, run)
                step.detail = ("stayed green; " + (f"error rate {errors.describe(rate_after)}" if errors else
                               "error rate not checked (no [prometheus] configured)"))
            healthy_after = time.monotonic() - t0
            run.figure("Time to healthy", f"{healthy_after:.1f} s")
            if cfg.log_error_pattern:
                with run.step("check the logs since the restart") as step:
                    step.detail = _check_logs(controller, cfg, restarted_at, run)
            else:
                run.skip("check the logs since the restart", "log_error_pattern is empty")
            run.outcome = "recovered"
            announce(settings, run, Severity.INFO, f"{service} recovered in {healthy_after:.1f} s.")
            return RestartResult(service=service, restarted=True, why=why, seconds_to_ready=ready_after,
                                 seconds_to_healthy=healthy_after, probes_before=before,
                                 error_rate_before=rate_before, error_rate_after=rate_after)
        except (MetricsUnavailable, NotProven) as exc:
            but = ("its error rate could not be checked" if isinstance(exc, MetricsUnavailable) else
                   "its logs show errors since the restart" if isinstance(exc, ErrorsInLogs) else
                   "its logs since the restart could not be read")
            announce(settings, run, Severity.HIGH, f"{service} was restarted and /health stayed green, "
                     f"but {but}.", failed=exc)
            raise
        except Exception as exc:
            announce(settings, run, Severity.CRITICAL, f"Restart of {service} did not bring it back.", failed=exc)
            raise


def _confirm(base_url: str, timeout: float, errors: ErrorRate | None,
             run: RunReport) -> tuple[list[ProbeResult], list[str], float | None, str | None]:
    """Probe all three endpoints and read the error rate: what is wrong, if anything, and
    what the error rate said. An unreadable error rate is noted, not held against the
    service: the probes decide."""
    before = probe_all(base_url, timeout)
    sick = failures(before)
    for p in before:
        run.figure(f"Before: /{p.kind.value}", "ok" if p.ok else p.reason)
    rate, note = None, None
    if errors:
        try:
            rate = errors.read()
            note = errors.describe(rate)
        except MetricsUnavailable as exc:
            note = f"unknown: {first_line(exc)}"
        run.figure("Before: error rate", note)
        if errors.too_high(rate):
            sick.append(f"error rate {note}")
    return before, sick, rate, note


def _logs(controller: Controller, since: datetime | None = None) -> list[str]:
    try:
        return controller.logs(100, since=since)
    except ServiceError as exc:  # logs are evidence, not a reason to stop
        return [f"(logs unavailable: {exc})"]


class ErrorRateTooHigh(RunbookError):
    """The error rate stayed above its threshold after the restart."""


class NotProven(RunbookError):
    """The service is back and healthy, but a success criterion could not be met or checked."""


class ErrorsInLogs(NotProven):
    """The service logged errors after the restart."""


def _check_logs(controller: Controller, cfg: ServiceConfig, since: datetime, run: RunReport) -> str:
    """Reference success criterion "no new errors in logs": the lines it wrote since
    the restart, against the service's `log_error_pattern`."""
    try:
        lines = controller.logs(LOG_LINES, since=since)
    except ServiceError as exc:
        raise NotProven(f"the logs since the restart could not be read: {exc}") from None
    bad = cfg.error_lines(lines)
    run.figure("Errors in logs since restart", f"{len(bad)} in {len(lines)} lines"
               + (": " + " / ".join(bad[:5]) if bad else ""))
    if bad:
        raise ErrorsInLogs(f"{len(bad)} error lines in the logs since the restart; first: {bad[0]}")
    return f"{len(lines)} lines, no errors"


def _watch(base_url: str, seconds: float, timeout: float, errors: ErrorRate | None,
           run: RunReport) -> float | None:
    """/health must pass at every probe for `seconds`; then, where Prometheus is
    configured, the error rate must be under its threshold. Readings every few seconds
    go into the report, so a slow return to baseline shows."""
    start = time.monotonic()
    end, next_reading, readings = start + seconds, start, []
    while True:
        result = probe(base_url, ProbeKind.HEALTH, timeout)
        if not result.ok:
            raise ServiceNotReady(f"{base_url}/health failed while watching: {result.reason}")
        now = time.monotonic()
        if errors and now >= next_reading and now < end:
            next_reading = now + READING_INTERVAL
            try:
                readings.append(f"{now - start:.0f}s {percent(errors.read())}")
            except MetricsUnavailable as exc:  # one missed reading is not a verdict; the last one is
                readings.append(f"{now - start:.0f}s unknown ({first_line(exc)})")
            run.figure("Error rate while watching", ", ".join(readings))  # kept if a later step fails
        if now >= end:
            break
        time.sleep(min(1.0, max(end - now, 0)))
    if errors is None:
        return None
    rate = _last_reading(errors)
    readings.append(f"{time.monotonic() - start:.0f}s {percent(rate)}")
    run.figure("Error rate while watching", ", ".join(readings))
    run.figure("Error rate after", errors.describe(rate))
    if errors.too_high(rate):
        raise ErrorRateTooHigh(f"the error rate is still {errors.describe(rate)} after watching for "
                               f"{seconds:g}s")
    return rate


def _last_reading(errors: ErrorRate, attempts: int = 3) -> float | None:
    """The reading that decides: a Prometheus hiccup gets two more chances, 1 s apart."""
    for _ in range(attempts - 1):
        try:
            return errors.read()
        except MetricsUnavailable:
            time.sleep(1.0)
    return errors.read()
