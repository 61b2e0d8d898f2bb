"""Scheduled health check of every configured service (every minute)."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow
from pydantic import BaseModel

import flows._common  # noqa: F401 - keeps tracebacks of our own errors out of its run log
from tasks.config import load_settings
from tasks.errors import RunbookError
from tasks.probes import ProbeResult, failures, probe_all
from tasks.report import RunReport


class ServiceHealth(BaseModel):
    service: str
    healthy: bool
    probes: list[ProbeResult]


class HealthCheckResult(BaseModel):
    services: list[ServiceHealth]

    @property
    def healthy(self) -> bool:
        return all(s.healthy for s in self.services)


class ServicesUnhealthy(RunbookError):
    """At least one service failed a probe (the run's state records it)."""


@flow(name="health-check", log_prints=True)
def health_check(metrics_file: str | None = None) -> HealthCheckResult:
    """Probe /health, /ready and /live of every configured service.

    Use: every minute (scheduled), or by hand for a quick look. The outcome is recorded
    for availability figures twice: the run's state (Completed when every service passed,
    Failed otherwise) and, when `metrics_file` is given, Prometheus metrics in the
    textfile-collector format (`runbooks_probe_success`, `runbooks_probe_latency_seconds`),
    written atomically.

    Args:
        metrics_file: Also write the probe results here, in Prometheus' textfile
            format (e.g. node_exporter's textfile directory); empty: no file.
    """
    settings = load_settings()
    with RunReport("Health check", "all services") as run:
        found = []
        for name in sorted(settings.services):
            cfg = settings.service(name)
            with run.step(name) as step:
                probes = probe_all(cfg.base_url, cfg.probe_timeout)
                healthy = all(p.ok for p in probes)
                step.detail = "; ".join(failures(probes)) or "healthy"
                step.outcome = "ok" if healthy else "failed"
            found.append(ServiceHealth(service=name, healthy=healthy, probes=probes))
            print(f"{name}: {step.detail}")
        result = HealthCheckResult(services=found)
        if metrics_file:
            try:
                write_metrics(Path(metrics_file), result)
            except OSError as exc:
                raise RunbookError(f"cannot write the metrics file {metrics_file}: {exc.strerror}") from None
        sick = [s.service for s in found if not s.healthy]
        run.figure("Services", f"{len(found) - len(sick)}/{len(found)} healthy")
        if sick:
            raise ServicesUnhealthy(f"unhealthy: {', '.join(sick)}")
        return result


def write_metrics(path: Path, result: HealthCheckResult) -> None:
    """Prometheus textfile-collector format, replaced atomically (never half-written)."""
    lines = ["# HELP runbooks_probe_success 1 if the probe passed, else 0.",
             "# TYPE runbooks_probe_success gauge"]
    lines += [f'runbooks_probe_success{{service="{s.service}",probe="{p.kind.value}"}} {int(p.ok)}'
              for s in result.services for p in s.probes]
    lines += ["# HELP runbooks_probe_latency_seconds How long the probe took.",
              "# TYPE runbooks_probe_latency_seconds gauge"]
    lines += [f'runbooks_probe_latency_seconds{{service="{s.service}",probe="{p.kind.value}"}} '
              f"{p.latency_ms / 1000:.4f}" for s in result.services for p in s.probes]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text("\n".join(lines) + "\n")
    os.replace(partial, path)
