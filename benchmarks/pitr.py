#!/usr/bin/env python3
"""Physical (pgBackRest) against logical (pg_dump) backup and restore of a ~1 GB
database, point-in-time restore with a known amount of WAL to replay, and the RPO
measured with the default archive_timeout, all in one run on one cluster.

    .venv/bin/python benchmarks/pitr.py [--scale 68] [--drill-seconds 90]

The cluster is tests/pitr_cluster.py's (initdb from Debian's PostgreSQL, run as the
postgres user, fsync off, archiving through pgBackRest to a local repository), with
pgBackRest at process-max 2 and zstd level 3. The data is `pgbench -i -s 68`
(about 1 GB). Flows run through the Prefect engine against a temporary server
(`prefect_test_harness`).

Measured:
  - backup: pitr-backup full (pgBackRest) against backup-database (pg_dump, zstd);
  - restore to verified: pitr-restore-test (restore, recover to the end of the archive,
    row counts of every database) against restore-test (download, sha256, pg_restore
    -j2, row counts and sequences against the manifest); both stop their clock before
    pg_amcheck; `--repeat` times each, physical first (a logical restore test writes
    its scratch database through the cluster's WAL, which a physical restore after it
    would replay), each after a `sync`; the medians are compared;
  - point in time: an incremental backup, pgbench writes for 20 s (their WAL bytes
    counted), then pitr-restore to the second after them: its time to verified;
  - RPO: pitr-drill with the pitr section's default archive_timeout (30 s), writing a
    marker a second; what it loses depends on where the kill falls between two forced
    segment switches (0 to 30 s plus the push).

Targets: physical restore-to-verified at least 3x faster than the logical one at
1 GB; RPO under 60 s. Writes benchmarks/results/pitr.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("CI", "")

RESULTS = REPO / "benchmarks" / "results" / "pitr.json"


def pgbench(cluster, *args: str) -> str:  # type: ignore[no-untyped-def]
    proc = cluster.as_postgres(str(cluster.bin_dir / "pgbench"), "-h", "127.0.0.1", "-p", str(cluster.port),
                               *args, "app")
    return proc.stdout + proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=68, help="pgbench scale (68: about 1 GB)")
    parser.add_argument("--drill-seconds", type=int, default=80,
                        help="how long the drill writes (80: the kill falls between two archive_timeout switches)")
    parser.add_argument("--repeat", type=int, default=3, help="restores of each kind (the median is reported)")
    args = parser.parse_args()

    from deployments.environment import quiet_prefect

    quiet_prefect()
    from prefect.testing.utilities import prefect_test_harness

    from flows.backup_database import backup_database
    from flows.pitr_backup import pitr_backup
    from flows.pitr_drill import pitr_drill
    from flows.pitr_restore import pitr_restore
    from flows.pitr_restore_test import pitr_restore_test
    from flows.restore_test import restore_test
    from tests.pitr_cluster import flush_archive, pitr_cluster

    results: dict[str, object] = {"date": datetime.now().isoformat(timespec="seconds"), "scale": args.scale}
    with prefect_test_harness(server_startup_timeout=60), \
            pitr_cluster("bench", archive_timeout=30, extra="drill = true\n") as cluster:
        t0 = time.monotonic()
        pgbench(cluster, "-i", "-q", "-s", str(args.scale))
        size = cluster.sql("SELECT pg_database_size('app')")[0][0]
        print(f"pgbench -i -s {args.scale}: {size / 1e9:.2f} GB in {time.monotonic() - t0:.0f} s", flush=True)
        results["database_bytes"] = size

        physical = pitr_backup("bench", type="full").sets[0]
        print(f"physical backup (pgBackRest full): {physical.seconds:.1f} s, "
              f"{physical.stored_bytes / 1e6:.0f} MB stored", flush=True)
        logical = backup_database("bench")
        print(f"logical backup (backup-database): {logical.seconds:.1f} s, {logical.stored_bytes / 1e6:.0f} MB stored",
              flush=True)
        times: dict[str, list[float]] = {"physical": [], "logical": []}
        # Physical first: a logical restore test writes its scratch database through the
        # cluster's WAL, which a later physical restore would have to replay. Each run
        # starts after a sync, so none pays for the writeback of the one before.
        for kind, run in (("physical", pitr_restore_test), ("logical", restore_test)):
            for i in range(args.repeat):
                os.sync()
                times[kind].append(run("bench").time_to_verified_seconds)
                print(f"{kind} restore to verified ({i + 1}): {times[kind][-1]:.1f} s", flush=True)
        results |= {"physical_backup_seconds": physical.seconds, "physical_stored_bytes": physical.stored_bytes,
                    "logical_backup_seconds": logical.seconds, "logical_stored_bytes": logical.stored_bytes,
                    "physical_restore_runs": times["physical"], "logical_restore_runs": times["logical"],
                    "physical_restore_seconds": statistics.median(times["physical"]),
                    "logical_restore_seconds": statistics.median(times["logical"])}

        # A fresh incremental set first: the replay is then pgbench's WAL alone (not the
        # scratch databases the logical restore tests wrote through the cluster).
        pitr_backup("bench", type="incr")
        lsn0 = cluster.sql("SELECT pg_current_wal_lsn()")[0][0]
        out = pgbench(cluster, "-T", "20", "-c", "2", "-j", "2")
        tps = next((ln for ln in out.splitlines() if ln.startswith("tps")), "tps ?")
        time.sleep(1.1)
        target = cluster.sql("SELECT now()")[0][0]
        wal_bytes = cluster.sql("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", lsn0)[0][0]
        flush_archive(cluster, timeout=120)
        pit = pitr_restore("bench", target_time=target.isoformat())
        cluster.pg_ctl("stop", "-m", "fast", data_dir=Path(pit.data_dir))
        subprocess.run(["rm", "-rf", pit.data_dir], check=True)
        print(f"point in time after 20 s of pgbench ({tps.strip()}, {float(wal_bytes) / 1e6:.0f} MB of WAL): "
              f"verified in {pit.time_to_verified_seconds:.1f} s", flush=True)
        results |= {"pit_wal_bytes": float(wal_bytes), "pit_seconds": pit.time_to_verified_seconds, "pit_tps": tps}

        drill = pitr_drill("bench", write_seconds=args.drill_seconds)
        print(f"RPO drill (archive_timeout 30 s): {drill.rpo_seconds:.1f} s lost "
              f"({drill.markers_lost} of {drill.markers_written} markers)", flush=True)
        results |= {"rpo_seconds": drill.rpo_seconds, "rpo_markers_lost": drill.markers_lost,
                    "rpo_markers_written": drill.markers_written, "drill_rto_seconds": drill.rto_seconds}

    ratio = results["logical_restore_seconds"] / results["physical_restore_seconds"]  # type: ignore[operator]
    rpo = results["rpo_seconds"]
    print("\n| measure | physical (pgBackRest) | logical (pg_dump) | ratio | target | result |")
    print("|---|---:|---:|---:|---|---|")
    print(f"| backup, {size / 1e9:.2f} GB | {physical.seconds:.1f} s | {logical.seconds:.1f} s | "
          f"{logical.seconds / physical.seconds:.2f} | | |")
    print(f"| stored | {physical.stored_bytes / 1e6:.0f} MB | {logical.stored_bytes / 1e6:.0f} MB | | | |")
    print(f"| restore to verified (median of {args.repeat}) | {results['physical_restore_seconds']:.1f} s | "
          f"{results['logical_restore_seconds']:.1f} s | {ratio:.2f} | >= 3 | {'PASS' if ratio >= 3 else 'FAIL'} |")
    print(f"| point in time, {float(wal_bytes) / 1e6:.0f} MB WAL replayed | {pit.time_to_verified_seconds:.1f} s | "
          "| | | |")
    print(f"| RPO, archive_timeout 30 s | {rpo:.1f} s | | | < 60 s | {'PASS' if rpo < 60 else 'FAIL'} |")  # type: ignore[operator]
    results["ratio"] = ratio
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
