#!/usr/bin/env python3
"""How fast a key that reads personal data is refused: from its alert reaching the
receiver, and from the revocation run's start, to the attacker's first 401 from the live
service; against the same steps done by hand with no Prefect (UPDATE, DEL, poll), in
the same run.

    .venv/bin/python benchmarks/security.py [--repeat 5]

The stack is the e2e test's (tests/e2e/test_security.py): Debian's Prometheus (the
repository's rules, `for:` 2 s, 1 s scrapes) and Alertmanager (group_wait 1 s),
`runbooks serve` with its receiver and a Prefect server on SQLite, the demo service
under the process controller on PostgreSQL (127.0.0.1:5432, RUNBOOKS_TEST_PG) and Redis
(127.0.0.1:6379). Each repetition: a key with a day of ordinary use starts reading
/api/profile ten times a second from a new address; the moments are read from the
system that knows them (Prometheus' alert, the incident run's creation, the revocation
subflow's start, the attacker's first 401).

Target: alert to 401 under 10 s (the reference: under 2 minutes, by hand 5-15 minutes).
Writes benchmarks/results/security.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psycopg  # noqa: E402
import redis  # noqa: E402

from tests.conftest import ADMIN_DSN, free_port, sample_database  # noqa: E402
from tests.e2e.conftest import (BIN, AlertPorts, alert_sections, alert_stack, api_client, run,  # noqa: E402
                                wait_for, write_config)
from tests.e2e.test_security import ROUTES, TOKEN, Traffic, _firing, _runs  # noqa: E402
from tests.security_stack import LIMITS, new_key, security_section, usual_use  # noqa: E402
from tests.shared_redis import REDIS_URL, redis_namespace  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "security.json"
TARGET_SECONDS = 10.0


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def by_hand(dsn: str, url: str, ns: str) -> float:
    """The floor: the runbook's change and check with nothing around them."""
    key_id, plaintext = new_key(dsn, user_id=31)
    assert httpx.get(f"{url}/api/orders", headers={"Authorization": f"Bearer {plaintext}"}).status_code == 200
    digest = hashlib.sha256(plaintext.encode()).hexdigest()
    t0 = time.monotonic()
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE api_keys SET revoked_at = now(), revoke_reason = 'bench' WHERE id = %s", (key_id,))
    redis.Redis.from_url(REDIS_URL).delete(f"{ns}apikey:{digest}")
    while httpx.get(f"{url}/api/orders", headers={"Authorization": f"Bearer {plaintext}"}).status_code != 401:
        time.sleep(0.01)
    return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from demo.service import runbooks_section
    from tests.slack_standin import running_standin

    root = Path(tempfile.mkdtemp(prefix="runbooks-bench-security-"))
    api_port, ports = free_port(), AlertPorts()
    rows: list[dict[str, float]] = []
    hand: list[float] = []
    with sample_database(ADMIN_DSN, "rb_bench_security") as dsn, redis_namespace("rbbench") as (_, ns):
        limits = root / "limits.toml"
        limits.write_text(LIMITS)
        argv = [sys.executable, "-m", "demo.service", "--dsn", dsn, "--port", str(api_port), "--redis", REDIS_URL,
                "--key-prefix", ns, "--limits", str(limits)]
        with running_standin() as slack:
            config = write_config(root / "runbooks.toml", dsn, root / "backups")
            config.write_text(config.read_text() + runbooks_section(dsn, api_port, root, command=argv, grace_seconds=1)
                              + security_section(root, ns) + alert_sections(slack.url, ports) + ROUTES)
            with alert_stack(root, config, api_port, TOKEN, ports,
                             ["incident-response/incident-response", "api-key-revocation/api-key-revocation"]) as stack:
                url, server = stack["api"], stack["server"]
                for i in range(args.repeat):
                    hand.append(by_hand(dsn, url, ns))
                    key_id, plaintext = new_key(dsn, user_id=40 + i)
                    usual_use(dsn, key_id)
                    attacker = Traffic(url, plaintext, "/api/profile", [f"203.0.113.{100 + i}"], every=0.1)
                    try:
                        alert = wait_for(lambda: [a for a in _firing(stack["prometheus"], "ApiKeyNewPiiAccess")
                                                  if a["labels"]["key_prefix"] == plaintext[:16]], 120, "the alert")[0]
                        wait_for(lambda: attacker.first_401, 120, "the attacker's 401")
                    finally:
                        attacker.end()
                    with api_client(server.url) as client:
                        revocation = wait_for(lambda: [r for r in _runs(client, "api-key-revocation")
                                                       if r["parameters"].get("key") == plaintext[:16]
                                                       and r.get("start_time")], 60, "the revocation run")[0]
                        incident = next(r for r in _runs(client, "incident-response")
                                        if r["parameters"]["alert"]["labels"].get("key_prefix") == plaintext[:16])
                    received = _ts(incident["created"])  # the receiver handed it over: the run exists
                    row = {"pending_to_401": attacker.first_401 - _ts(alert["activeAt"]),
                           "received_to_401": attacker.first_401 - received,
                           "flow_start_to_401": attacker.first_401 - _ts(revocation["start_time"])}
                    rows.append(row)
                    print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in row.items()), flush=True)
                    run([str(BIN / "runbooks"), "incident", "resolve", revocation["parameters"]["incident"],
                         "--by", "bench", "--note", "benchmark"], stack["env"])
    summary = {k: {"median": round(statistics.median(r[k] for r in rows), 2), "p95": round(p95([r[k] for r in rows]), 2)}
               for k in rows[0]}
    summary["by_hand_update_del_poll"] = {"median": round(statistics.median(hand), 3), "p95": round(p95(hand), 3)}
    print("\n| measure | median s | p95 s |\n|---|---:|---:|")
    for k, v in summary.items():
        print(f"| {k} | {v['median']} | {v['p95']} |")
    met = summary["received_to_401"]["p95"] < TARGET_SECONDS
    print(f"\ntarget alert received -> 401 under {TARGET_SECONDS:g} s (p95): {'PASS' if met else 'FAIL'}; "
          f"our flow start -> 401 {summary['flow_start_to_401']['median']} s against "
          f"{summary['by_hand_update_del_poll']['median']} s for the bare UPDATE, DEL and poll")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"date": datetime.now().isoformat(timespec="seconds"), "repeat": args.repeat,
                                   "runs": rows, "by_hand": hand, "summary": summary,
                                   "nproc": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
