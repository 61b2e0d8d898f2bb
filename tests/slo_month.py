"""A month of synthetic metrics for the SLO report, backfilled into Debian's Prometheus
with `promtool tsdb create-blocks-from openmetrics`: a sample every 5 minutes through
November 2026 (UTC), 1,000 requests a minute, for five services:

- `api`: a 50-minute outage of 5xx answers (its probe down) on 10 November from 10:00,
  and every request of 20 November between 100 and 250 ms;
- `gappy`: no samples at all for 6 hours from 15 November 12:00;
- `quiet`: scraped and probed, no requests;
- `breach`: 10 hours of 5xx from 5 November 00:00;
- `green`: nothing wrong.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import httpx

START = int(datetime(2026, 11, 1, tzinfo=timezone.utc).timestamp())
STEP = 300  # a sample every 5 minutes
MINUTES = 30 * 1440
PER_STEP = 5000  # requests per 5 minutes: 1,000 a minute
OUTAGE = (int(datetime(2026, 11, 10, 10, tzinfo=timezone.utc).timestamp()), 50 * 60)  # 50 min of 5xx, probe down
SLOW_DAY = int(datetime(2026, 11, 20, tzinfo=timezone.utc).timestamp())  # every request 100-250 ms
GAP = (int(datetime(2026, 11, 15, 12, tzinfo=timezone.utc).timestamp()), 6 * 3600)  # no samples at all
BREACH = (int(datetime(2026, 11, 5, tzinfo=timezone.utc).timestamp()), 600 * 60)  # 10 hours of 5xx


def _series(job: str, outage: tuple[int, int] | None = None, slow: int | None = None,
            gap: tuple[int, int] | None = None, traffic: bool = True) -> list[str]:
    ok = bad = 0
    buckets = {"0.05": 0, "0.1": 0, "0.25": 0, "+Inf": 0}
    lines: list[str] = []
    for i in range(MINUTES // 5 + 1):
        t = START + i * STEP
        down = outage is not None and outage[0] <= t - STEP < outage[0] + outage[1]  # the 5 min just past
        if i:
            if down:
                bad += PER_STEP
            else:
                ok += PER_STEP
            fast = not (slow is not None and slow <= t - STEP < slow + 86400)
            for le in buckets:
                if fast or le in ("0.25", "+Inf"):
                    buckets[le] += PER_STEP
        if gap is not None and gap[0] < t < gap[0] + gap[1]:
            continue
        lines.append(f'up{{job="{job}",instance="x"}} 1 {t}')
        probe_down = outage is not None and outage[0] <= t < outage[0] + outage[1]
        lines.append(f'runbooks_probe_success{{service="{job}",probe="health"}} {0 if probe_down else 1} {t}')
        if traffic:
            lines.append(f'fraiseql_http_requests_total{{job="{job}",status="200"}} {ok} {t}')
            lines.append(f'fraiseql_http_requests_total{{job="{job}",status="500"}} {bad} {t}')
            lines += [f'fraiseql_query_duration_seconds_bucket{{job="{job}",le="{le}"}} {n} {t}'
                      for le, n in buckets.items()]
    return lines


@contextmanager
def backfilled_prometheus(root: Path) -> Iterator[str]:
    """Debian's Prometheus holding November 2026 for five services (above), on a free
    loopback port, for the block."""
    from tests.conftest import free_port, need

    binary, promtool = shutil.which("prometheus"), shutil.which("promtool")
    need(binary is not None and promtool is not None, "prometheus is not installed (apt-get install prometheus)")
    root.mkdir(parents=True, exist_ok=True)
    by_metric: dict[str, list[str]] = {}
    for line in (_series("api", outage=OUTAGE, slow=SLOW_DAY) + _series("gappy", gap=GAP)
                 + _series("quiet", traffic=False) + _series("breach", outage=BREACH) + _series("green")):
        by_metric.setdefault(line.split("{")[0], []).append(line)
    types = {"up": "gauge", "runbooks_probe_success": "gauge", "fraiseql_http_requests_total": "counter",
             "fraiseql_query_duration_seconds_bucket": "counter"}
    text = [f"# TYPE {m} {types[m]}\n" + "\n".join(v) for m, v in by_metric.items()]
    data = root / "month.om"
    data.write_text("\n".join(text) + "\n# EOF\n")
    subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", "--max-block-duration=720h",
                    str(data), str(root / "tsdb")], check=True, capture_output=True, timeout=300)
    (root / "prometheus.yml").write_text("global:\n  scrape_interval: 1m\n")
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'tsdb'}",
                             "--storage.tsdb.retention.time=3650d", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=open(root / "log", "wb"))
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


