#!/usr/bin/env python3
"""One service-month SLO report against a backfilled Prometheus: its time and its peak
memory, beside the bare measurements (the same queries and arithmetic, no Prefect, no
chart, no artifacts) in the same run.

    .venv/bin/python benchmarks/slo.py [--repeat 3]

The month is tests/slo_month.py's November 2026 (a sample every 5 minutes, 1,000
requests a minute, an outage and a slow day) in Debian's Prometheus on loopback. Each
measurement runs in a child process of its own, which reports its wall time and its
peak RSS (VmHWM); the flow runs through the Prefect engine against a temporary server
(`prefect_test_harness`, started before the clock).

Targets: under 10 s and under 300 MB for one service-month report.
Writes benchmarks/results/slo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.slo_month import backfilled_prometheus  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "slo.json"
CHILD = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
kind, prom = sys.argv[1], sys.argv[2]

def peak_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

if kind == "bare":
    from tasks import slo
    from tasks.prometheus import PrometheusConfig
    spec, p = slo.SloSpec(), PrometheusConfig(url=prom)
    t0 = time.monotonic()
    start, end = slo.month_bounds("2026-11", spec.zone)
    samples = slo.month_samples(p, spec, "api", "api", start, end)
    month = slo.measure(p, spec, "api", "api", start, end, samples)
    days = [slo.measure(p, spec, "api", "api", a, b, samples) for _, a, b in slo.days_of(start, end, spec.zone)]
    seconds = time.monotonic() - t0
    assert month.requests == 43_200_000 and len(days) == 30
else:
    from deployments.environment import quiet_prefect
    quiet_prefect()
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=60):
        from flows.slo_report import slo_report
        t0 = time.monotonic()
        result = slo_report("api", month="2026-11")
        seconds = time.monotonic() - t0
    assert result.requests == 43_200_000
print(json.dumps({"seconds": seconds, "peak_mb": peak_mb()}))
"""


def child(kind: str, prom: str, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, prom, str(REPO)], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"{kind} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="runbooks-bench-slo-"))
    with backfilled_prometheus(root / "prom") as prom:
        config = root / "runbooks.toml"
        config.write_text(f'slo_report_dir = "{root / "reports"}"\n[prometheus]\nurl = "{prom}"\n[services.api]\n'
                          f'base_url = "http://127.0.0.1:1"\ncontroller = {{ kind = "process", command = ["true"], '
                          f'pid_file = "{root}/p", log_file = "{root}/l" }}\n[slo.api]\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RUNBOOKS_"))}
        env.update(RUNBOOKS_CONFIG=str(config), PREFECT_HOME=str(root / "prefect"))
        runs: dict[str, list[dict[str, float]]] = {"bare": [], "flow": []}
        for i in range(args.repeat):
            for kind in ("bare", "flow"):
                runs[kind].append(child(kind, prom, env))
                print(f"run {i + 1} {kind}: {runs[kind][-1]['seconds']:.2f} s, {runs[kind][-1]['peak_mb']:.0f} MB",
                      flush=True)
    summary = {kind: {"median_seconds": round(statistics.median(r["seconds"] for r in rows), 2),
                      "max_seconds": round(max(r["seconds"] for r in rows), 2),
                      "peak_mb": round(max(r["peak_mb"] for r in rows), 1)} for kind, rows in runs.items()}
    print("\n| | median s | max s | peak RSS MB |\n|---|---:|---:|---:|")
    for kind, s in summary.items():
        print(f"| {kind} | {s['median_seconds']} | {s['max_seconds']} | {s['peak_mb']} |")
    flow = summary["flow"]
    print(f"\ntarget one report < 10 s: {'PASS' if flow['max_seconds'] < 10 else 'FAIL'}; "
          f"< 300 MB: {'PASS' if flow['peak_mb'] < 300 else 'FAIL'} "
          f"(the bare measurements: {summary['bare']['median_seconds']} s, {summary['bare']['peak_mb']} MB)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"date": datetime.now().isoformat(timespec="seconds"), "runs": runs,
                                   "summary": summary, "nproc": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
