#!/usr/bin/env python
"""Benchmark: our backup and restore-test runbooks against the raw PostgreSQL tools.

One run measures, on the same database and the same PostgreSQL 16 client tools:

  backup   the `backup-database` flow (its dump task: pg_dump -> zstd -> sha256 -> store)
           against `pg_dump -Fc -Z0 | zstd -3 -q > file`;
  restore  the `restore-test` flow's time to verified against
           `pg_restore -j2 --exit-on-error` of the uncompressed archive, and against the
           reference procedure `gunzip -c dump.sql.gz | psql -q -v ON_ERROR_STOP=1`;
  memory   the peak RSS of the Python process that runs the dump task
           (`tasks.backup_tasks.dump_to_store.fn`, in a child process, no Prefect server)
           at the full size and at about a quarter of it;

plus a breakdown of where the time goes. It prints a comparison table and writes every
raw figure to benchmarks/results/backup_restore.json.

    python benchmarks/backup_restore.py              # 1024 MB database (several minutes)
    python benchmarks/backup_restore.py --quick      # ~100 MB smoke run
    python benchmarks/backup_restore.py --pg-dsn postgresql://postgres@127.0.0.1/postgres

By default an embedded PostgreSQL (pgserver) is started in a temporary directory; with
--pg-dsn an existing server is used instead (the DSN must be able to CREATE DATABASE).
Everything the run creates (server, databases, files) is removed at the end, also on
failure or Ctrl-C. See benchmarks/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from deployments.environment import quiet_prefect  # does not import prefect

MB = 1_000_000  # throughput and sizes in the table: decimal MB, as the manifest's MB/s
MiB = 1 << 20  # --size-mb and memory: binary, as demo.sample_data --size-mb
ZSTD = "/usr/bin/zstd"
GZIP = shutil.which("gzip") or "/usr/bin/gzip"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "backup_restore.json"

# Targets: (measure key, comparison, threshold). See README.md.
TARGETS = {
    "backup_throughput_ratio": (">=", 0.90),
    "restore_vs_pg_restore": ("<=", 1.15),
    "restore_vs_reference": ("<", 1.00),
    "rss_full_mib": ("<", 300.0),
    "rss_quarter_mib": ("<", 300.0),
    "rss_flatness": ("<=", 1.10),
}


class BenchError(Exception):
    """A failure with a message that says what went wrong (printed without traceback)."""


def say(text: str = "") -> None:
    print(text, flush=True)


def _quiet_environment(verbose: bool) -> None:
    """Before Prefect is imported: no telemetry, no server noise; flow logs go to the
    API as usual but the console shows only warnings (unless --verbose)."""
    quiet_prefect()
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    # platformdirs warns when XDG_RUNTIME_DIR is unset (pgserver asks it for a lock dir).
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")


# --------------------------------------------------------------------------- small helpers


def pgserver_bin_dir() -> Path | None:
    """pgserver's bundled PostgreSQL tools, found without importing pgserver."""
    spec = importlib.util.find_spec("pgserver")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            path = Path(loc) / "pginstall" / "bin"
            if (path / "pg_dump").is_file():
                return path
    return None


def first_line(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "fatal" in ln.lower()] or lines
    return " | ".join(errors[:3]) or "no message"


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


class CpuMeter:
    """Share of all CPUs that were busy (any process) between start and stop."""

    def __init__(self) -> None:
        self.busy0, self.total0 = cpu_times()

    def stop(self) -> float:
        busy, total = cpu_times()
        return round((busy - self.busy0) / max(total - self.total0, 1e-9), 3)


def proc_status(pid: str = "self") -> dict[str, int]:
    """VmRSS / VmHWM / ... in KiB from /proc/<pid>/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Vm"):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def rusage_cpu(ru: Any) -> float:
    return round(ru.ru_utime + ru.ru_stime, 3)


def conninfo_for(admin_dsn: str, dbname: str) -> str:
    from psycopg.conninfo import make_conninfo

    return make_conninfo(admin_dsn, dbname=dbname)


def tool_conninfo(dsn: str) -> tuple[str, dict[str, str]]:
    """A conninfo without the password, and an environment that carries it (PGPASSWORD)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    password = params.pop("password", None)
    env = dict(os.environ)
    env.pop("PGPASSWORD", None)
    if password:
        env["PGPASSWORD"] = str(password)
    return make_conninfo("", **params), env


def version_of(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        return f"unavailable ({exc.strerror})"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else ""


def toml_str(value: str) -> str:
    """A TOML basic string (JSON's escaping is a subset TOML accepts)."""
    return json.dumps(value)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


# --------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.verbose = args.verbose
        self.work: Path | None = None
        self.server_dir: Path | None = None
        self.server: Any = None
        self.admin_dsn: str = ""
        self.bin_dir: Path | None = None
        self.prefix = f"rb_bench_{secrets.token_hex(3)}"
        self.dbnames: dict[str, str] = {}  # config name -> database name
        self.created_dbs: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.old_config = os.environ.get("RUNBOOKS_CONFIG")
        self.results: dict[str, Any] = {}
        self.t_start = time.monotonic()

    # ---------------------------------------------------------------- setup and cleanup

    def setup(self) -> None:
        base = Path(self.args.work_dir) if self.args.work_dir else None
        self.work = Path(tempfile.mkdtemp(prefix="rb-bench-", dir=base))
        if self.args.bin_dir:
            self.bin_dir = Path(self.args.bin_dir)
        else:
            self.bin_dir = pgserver_bin_dir()
        if self.bin_dir is None or not (self.bin_dir / "pg_dump").is_file():
            raise BenchError("no PostgreSQL tools: install pgserver or pass --bin-dir")
        for tool in ("pg_dump", "pg_restore", "psql"):
            if not os.access(self.bin_dir / tool, os.X_OK):
                raise BenchError(f"{self.bin_dir / tool} is missing or not executable")
        for tool in (ZSTD, GZIP):
            if not os.access(tool, os.X_OK):
                raise BenchError(f"{tool} is missing (the raw pipelines need it)")
        if self.args.pg_dsn:
            self.admin_dsn = self.args.pg_dsn
            say("using the PostgreSQL server given by --pg-dsn")
        else:
            self._start_pgserver()
        import psycopg

        try:
            with psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=10) as conn:
                self.server_version = str(conn.execute("SHOW server_version").fetchone()[0])
        except psycopg.Error as exc:
            raise BenchError(f"cannot connect to PostgreSQL: {first_line(str(exc))}") from None

    def _start_pgserver(self) -> None:
        say("starting embedded PostgreSQL (pgserver)...")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
        # As root, pgserver runs postgres as the user `pgserver`: it must reach the data dir.
        self.server_dir = Path(tempfile.mkdtemp(prefix="rb-bench-pg-"))
        os.chmod(self.server_dir, 0o777)
        self.server = pgserver.get_server(self.server_dir / "pgdata", cleanup_mode="stop")
        self.admin_dsn = self.server.get_uri()

    def cleanup(self) -> None:
        """Stop everything this run started; never raises."""
        for proc in self.procs:
            with contextlib.suppress(Exception):
                if proc.returncode is None and proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
        if self.admin_dsn and self.created_dbs:
            self._drop_all()
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.cleanup()
            self.server = None
        for path in (self.work, self.server_dir):
            if path is not None and path.exists():
                shutil.rmtree(path, ignore_errors=True)
        if self.old_config is None:
            os.environ.pop("RUNBOOKS_CONFIG", None)
        else:
            os.environ["RUNBOOKS_CONFIG"] = self.old_config

    def _drop_all(self) -> None:
        """Every database of this run: ours, and any restore-test scratch left behind."""
        import psycopg

        try:
            with psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=10) as conn:
                names = [r[0] for r in conn.execute(
                    "SELECT datname FROM pg_database WHERE datname LIKE %s",
                    (self.prefix + "%",)).fetchall()]
                for name in names:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception as exc:  # noqa: BLE001 - report, keep cleaning up
            say(f"warning: could not drop the benchmark databases ({first_line(str(exc))}); "
                f"drop databases named {self.prefix}* by hand")

    def create_db(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created_dbs.append(name)
        return conninfo_for(self.admin_dsn, name)

    def drop_db(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def db_size(self, name: str) -> int:
        import psycopg

        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            return int(conn.execute("SELECT pg_database_size(%s)", (name,)).fetchone()[0])

    def settle(self) -> None:
        """Before each timed measurement: flush PostgreSQL's dirty buffers and the OS's
        dirty pages, so one measurement's writes are not paid for by the next one."""
        import psycopg

        with contextlib.suppress(psycopg.Error), \
                psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
        os.sync()

    def tool(self, name: str) -> str:
        assert self.bin_dir is not None
        return str(self.bin_dir / name)

    # ---------------------------------------------------------------- subprocesses

    def _wait(self, proc: subprocess.Popen[bytes]) -> Any:
        """Reap `proc` with wait4 (for its CPU time); returns the rusage. (Not its peak RSS:
        Linux reports an exec'd child's ru_maxrss as at least its parent's RSS at fork.)"""
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        except ChildProcessError:
            proc.wait()
            return None
        proc.returncode = os.waitstatus_to_exitcode(status)
        return ru

    def run_pipeline(self, label: str, cmds: list[list[str]], *, env: dict[str, str] | None = None,
                     stdin: Path | None = None, stdout: Path | None = None) -> dict[str, Any]:
        """Run `cmds` connected by pipes (no shell); time from the first start to the last
        exit. Returns seconds, per-process CPU seconds, and the share of all CPUs busy."""
        with contextlib.ExitStack() as stack:
            errs = [stack.enter_context(tempfile.TemporaryFile()) for _ in cmds]
            src = stack.enter_context(open(stdin, "rb")) if stdin else subprocess.DEVNULL
            dst = stack.enter_context(open(stdout, "wb")) if stdout else subprocess.DEVNULL
            procs: list[subprocess.Popen[bytes]] = []
            meter = CpuMeter()
            t0 = time.perf_counter()
            prev = src
            for i, cmd in enumerate(cmds):
                last = i == len(cmds) - 1
                proc = subprocess.Popen(cmd, stdin=prev, stdout=dst if last else subprocess.PIPE,
                                        stderr=errs[i], env=env)
                self.procs.append(proc)
                procs.append(proc)
                if i > 0 and procs[i - 1].stdout is not None:
                    procs[i - 1].stdout.close()  # only the next process holds the pipe
                prev = proc.stdout
            usages = [self._wait(p) for p in reversed(procs)][::-1]
            seconds = time.perf_counter() - t0
            busy = meter.stop()
            for proc, err, cmd in zip(procs, errs, cmds):
                if proc.returncode != 0:
                    err.seek(0)
                    raise BenchError(f"{label}: {Path(cmd[0]).name} failed (exit {proc.returncode}): "
                                     f"{first_line(err.read())}")
        return {
            "seconds": round(seconds, 3),
            "cpu_busy_share": busy,
            "processes": [{"tool": Path(c[0]).name, "cpu_seconds": rusage_cpu(u) if u else None}
                          for c, u in zip(cmds, usages)],
        }

    # ---------------------------------------------------------------- building databases

    def build_database(self, key: str, name: str, size_mb: float) -> dict[str, Any]:
        """Create `name` and fill it with the demo's sample data to about `size_mb` MiB,
        then VACUUM ANALYZE and CHECKPOINT so no first-read hint-bit writes or autovacuum
        skew the measurements."""
        import psycopg

        from demo.sample_data import build, rows_for_size

        rows = rows_for_size(int(size_mb * MiB))
        dsn = self.create_db(name)
        self.dbnames[key] = name
        say(f"building {size_mb:.0f} MB database {name} ({rows:,} rows)...")
        stop = threading.Event()
        t0 = time.monotonic()

        def watch() -> None:
            try:
                with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
                    while not stop.wait(10):
                        size = conn.execute("SELECT pg_database_size(%s)", (name,)).fetchone()[0]
                        say(f"  ... {size / MiB:,.0f} MB on disk after {time.monotonic() - t0:.0f} s")
            except Exception:  # noqa: BLE001, S110 - progress only
                pass

        watcher = threading.Thread(target=watch, name="build-progress", daemon=True)
        watcher.start()
        try:
            counts = build(dsn, rows=rows)
        finally:
            stop.set()
            watcher.join(timeout=15)
        build_seconds = time.monotonic() - t0
        say(f"  loaded in {build_seconds:.0f} s; VACUUM ANALYZE and CHECKPOINT...")
        t1 = time.monotonic()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE)")
            try:
                conn.execute("CHECKPOINT")
            except psycopg.Error:
                pass  # needs superuser or pg_checkpoint; only makes the run quieter
        size = self.db_size(name)
        say(f"  {name}: {size / MB:,.1f} MB (pg_database_size), {sum(counts.values()):,} rows")
        return {"name": name, "requested_mb": size_mb, "rows_requested": rows,
                "rows": counts, "total_rows": sum(counts.values()), "size_bytes": size,
                "build_seconds": round(build_seconds, 1),
                "vacuum_seconds": round(time.monotonic() - t1, 1)}

    def write_config(self) -> Path:
        assert self.work is not None and self.bin_dir is not None
        store = self.work / "store"
        lines = []
        for key, name in self.dbnames.items():
            lines += [f"[databases.{key}]",
                      f"dsn = {toml_str(conninfo_for(self.admin_dsn, name))}",
                      f"bin_dir = {toml_str(str(self.bin_dir))}",
                      'store = "local"', "jobs = 2", "compression_level = 3", ""]
        lines += ["[stores.local]", 'kind = "local"', f"path = {toml_str(str(store))}", ""]
        path = self.work / "runbooks.toml"
        path.write_text("\n".join(lines))
        os.environ["RUNBOOKS_CONFIG"] = str(path)
        return path

    # ---------------------------------------------------------------- the measurements

    def run(self) -> None:
        args = self.args
        self.setup()
        assert self.work is not None
        size_mb = 100.0 if args.quick and args.size_mb is None else float(args.size_mb or 1024)
        quarter_mb = size_mb / 4
        self.results = {
            "benchmark": "backup_restore",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "quick": bool(args.quick),
            "repeat": args.repeat,
            "machine": self.machine(),
            "versions": self.versions(),
            "server": "pgserver (embedded)" if self.server is not None else "--pg-dsn",
            "units": {"MB": "10^6 bytes (sizes, throughput)", "MiB": "2^20 bytes (memory, --size-mb)"},
        }
        db = self.build_database("bench", self.prefix, size_mb)
        self.results["database"] = db
        self.write_config()

        say("starting a temporary Prefect server...")
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=60):
            self.results["backup"] = self.measure_backup(db)
            self.results["restore"] = self.measure_restore(db)
        self.results["reference"] = self.measure_reference(db)
        self.results["breakdown"] = self.measure_breakdown(db)
        self.results["memory"] = self.measure_memory(db, quarter_mb)
        self.results["table"] = self.table()
        self.results["total_seconds"] = round(time.monotonic() - self.t_start, 1)
        self.print_results()
        out = Path(args.json) if args.json else DEFAULT_RESULTS
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.results, indent=2) + "\n")
        say(f"\nresults written to {out}")

    def measure_backup(self, db: dict[str, Any]) -> dict[str, Any]:
        from flows.backup_database import backup_database
        from tasks import backups
        from tasks.config import load_settings

        assert self.work is not None
        size = db["size_bytes"]
        conninfo, env = tool_conninfo(conninfo_for(self.admin_dsn, db["name"]))
        raw_out = self.work / "raw.dump.zst"
        store = load_settings().open_store("local")
        raw_runs, our_runs = [], []
        for i in range(self.args.repeat):
            n = f" ({i + 1}/{self.args.repeat})" if self.args.repeat > 1 else ""
            self.settle()
            say(f"raw pipeline: pg_dump -Fc -Z0 | zstd -3 -q > file{n}...")
            run = self.run_pipeline("raw backup", [
                [self.tool("pg_dump"), "-Fc", "-Z0", f"--dbname={conninfo}"],
                [ZSTD, "-3", "-q"]], env=env, stdout=raw_out)
            t0 = time.perf_counter()
            with open(raw_out, "rb") as f:
                os.fsync(f.fileno())
            run["fsync_seconds"] = round(time.perf_counter() - t0, 3)
            run["bytes"] = raw_out.stat().st_size
            run["throughput_mb_s"] = round(size / run["seconds"] / MB, 1)
            raw_runs.append(run)
            say(f"  {run['seconds']:.1f} s, {run['throughput_mb_s']:.0f} MB/s, "
                f"{run['bytes'] / MB:,.1f} MB written")

            self.settle()
            say(f"our backup flow: backup_database(database='bench'){n}...")
            self_before, kids_before = (resource.getrusage(resource.RUSAGE_SELF),
                                        resource.getrusage(resource.RUSAGE_CHILDREN))
            meter = CpuMeter()
            t0 = time.perf_counter()
            result = backup_database(database="bench")
            wall = time.perf_counter() - t0
            busy = meter.stop()
            self_after, kids_after = (resource.getrusage(resource.RUSAGE_SELF),
                                      resource.getrusage(resource.RUSAGE_CHILDREN))
            m = backups.load_manifest(store, result.backup_id)
            ours = {
                "backup_id": m.id,
                "dump_task_seconds": round(m.duration_seconds, 3),
                "flow_wall_seconds": round(wall, 3),
                "throughput_mb_s": round(size / m.duration_seconds / MB, 1),
                "flow_throughput_mb_s": round(size / wall / MB, 1),
                "manifest_throughput_mb_s": round(m.throughput_mb_s, 1),  # dump bytes / s
                "dump_bytes": m.dump_bytes, "stored_bytes": m.stored_bytes,
                "toc_entries": m.toc_entries, "db_size_bytes_in_manifest": m.db_size_bytes,
                "cpu_busy_share": busy,
                "python_cpu_seconds": round(rusage_cpu(self_after) - rusage_cpu(self_before), 3),
                "tools_cpu_seconds": round(rusage_cpu(kids_after) - rusage_cpu(kids_before), 3),
                "steps": self.flow_timeline(f"backup-{m.database}"),
            }
            our_runs.append(ours)
            say(f"  dump task {ours['dump_task_seconds']:.1f} s ({ours['throughput_mb_s']:.0f} MB/s), "
                f"flow {ours['flow_wall_seconds']:.1f} s, {m.stored_bytes / MB:,.1f} MB stored")
        raw_s = median([r["seconds"] for r in raw_runs])
        ours_s = median([r["dump_task_seconds"] for r in our_runs])
        flow_s = median([r["flow_wall_seconds"] for r in our_runs])
        return {
            "db_size_bytes": size,
            "raw_command": "pg_dump -Fc -Z0 <db> | zstd -3 -q > file",
            "raw_runs": raw_runs, "our_runs": our_runs,
            "raw_seconds": raw_s, "ours_dump_task_seconds": ours_s, "ours_flow_seconds": flow_s,
            "raw_throughput_mb_s": round(size / raw_s / MB, 1),
            "ours_throughput_mb_s": round(size / ours_s / MB, 1),
            "ours_flow_throughput_mb_s": round(size / flow_s / MB, 1),
            "throughput_ratio": round(raw_s / ours_s, 3),
            "flow_throughput_ratio": round(raw_s / flow_s, 3),
        }

    def measure_restore(self, db: dict[str, Any]) -> dict[str, Any]:
        from flows.restore_test import restore_test

        assert self.work is not None
        raw_zst = self.work / "raw.dump.zst"
        plain = self.work / "raw.dump"
        say("decompressing the raw dump for pg_restore (not timed)...")
        self.run_pipeline("zstd -d", [[ZSTD, "-d", "-q", "-c"]], stdin=raw_zst, stdout=plain)
        raw_runs, our_runs = [], []
        for i in range(self.args.repeat):
            n = f" ({i + 1}/{self.args.repeat})" if self.args.repeat > 1 else ""
            target = f"{self.prefix}_raw"
            dsn = self.create_db(target)
            conninfo, env = tool_conninfo(dsn)
            self.settle()
            say(f"raw restore: pg_restore -j2 --exit-on-error -d <new db> <dump>{n}...")
            run = self.run_pipeline("raw restore", [
                [self.tool("pg_restore"), "-j2", "--exit-on-error", "-d", conninfo, str(plain)]],
                env=env)
            self.drop_db(target)
            raw_runs.append(run)
            say(f"  {run['seconds']:.1f} s")

            self.settle()
            say(f"our restore-test flow: restore_test(database='bench'){n}...")
            meter = CpuMeter()
            t0 = time.perf_counter()
            result = restore_test(database="bench")
            wall = time.perf_counter() - t0
            if not result.passed:
                raise BenchError(f"restore test did not pass: {result.mismatches[:3]}")
            ours = {
                "backup_id": result.backup_id,
                "time_to_verified_seconds": round(result.time_to_verified_seconds, 3),
                "restore_seconds": round(result.restore_seconds, 3),
                "flow_wall_seconds": round(wall, 3),
                "rows_checked": result.rows_checked, "tables_checked": result.tables_checked,
                "amcheck": result.amcheck, "cpu_busy_share": meter.stop(),
                "steps": self.flow_timeline("restore-test-bench"),
            }
            our_runs.append(ours)
            say(f"  verified in {ours['time_to_verified_seconds']:.1f} s (pg_restore "
                f"{ours['restore_seconds']:.1f} s), flow {wall:.1f} s")
        raw_s = median([r["seconds"] for r in raw_runs])
        ttv = median([r["time_to_verified_seconds"] for r in our_runs])
        flow_s = median([r["flow_wall_seconds"] for r in our_runs])
        return {
            "dump_bytes": plain.stat().st_size,
            "raw_command": "pg_restore -j2 --exit-on-error -d <new db> <uncompressed custom dump>",
            "raw_runs": raw_runs, "our_runs": our_runs,
            "raw_seconds": raw_s, "ours_time_to_verified_seconds": ttv,
            "ours_restore_seconds": median([r["restore_seconds"] for r in our_runs]),
            "ours_flow_seconds": flow_s,
            "ratio_ttv": round(ttv / raw_s, 3), "ratio_flow": round(flow_s / raw_s, 3),
        }

    def measure_reference(self, db: dict[str, Any]) -> dict[str, Any]:
        assert self.work is not None
        conninfo, env = tool_conninfo(conninfo_for(self.admin_dsn, db["name"]))
        sql_gz = self.work / "reference.sql.gz"
        self.settle()
        say("reference dump: pg_dump -Fp | gzip > file.sql.gz (timed separately)...")
        dump = self.run_pipeline("reference dump", [
            [self.tool("pg_dump"), "-Fp", f"--dbname={conninfo}"], [GZIP]], env=env, stdout=sql_gz)
        dump["bytes"] = sql_gz.stat().st_size
        say(f"  {dump['seconds']:.1f} s, {dump['bytes'] / MB:,.1f} MB")
        target = f"{self.prefix}_ref"
        tconn, tenv = tool_conninfo(self.create_db(target))
        self.settle()
        say("reference restore: gunzip -c file.sql.gz | psql -q -v ON_ERROR_STOP=1 -d <new db>...")
        restore = self.run_pipeline("reference restore", [
            [GZIP, "-d", "-c", str(sql_gz)],
            [self.tool("psql"), "-q", "-v", "ON_ERROR_STOP=1", "-d", tconn]], env=tenv)
        self.drop_db(target)
        say(f"  {restore['seconds']:.1f} s")
        return {"dump_command": "pg_dump -Fp <db> | gzip > file.sql.gz", "dump": dump,
                "restore_command": "gunzip -c file.sql.gz | psql -q -v ON_ERROR_STOP=1 -d <new db>",
                "restore": restore, "restore_seconds": restore["seconds"]}

    def measure_breakdown(self, db: dict[str, Any]) -> dict[str, Any]:
        """Each stage of our backup pipeline alone, on this database and its dump."""
        import zstandard

        assert self.work is not None
        say("breakdown: each stage of the pipeline alone...")
        conninfo, env = tool_conninfo(conninfo_for(self.admin_dsn, db["name"]))
        plain = self.work / "raw.dump"
        out: dict[str, Any] = {"dump_bytes": plain.stat().st_size}
        self.settle()
        run = self.run_pipeline("pg_dump alone", [
            [self.tool("pg_dump"), "-Fc", "-Z0", f"--dbname={conninfo}"]], env=env)
        out["pg_dump_to_devnull"] = run
        run = self.run_pipeline("zstd alone", [[ZSTD, "-3", "-q", "-c"]], stdin=plain)
        out["zstd_cli_file_to_devnull"] = run

        # Our Python stages, one thread, 1 MiB chunks, on the (cached) dump file: as in
        # tasks.backups.write_dump + LocalStore.put_stream, each stage timed on its own.
        with open(plain, "rb") as f:  # warm the page cache
            while f.read(1 << 24):
                pass
        sink = self.work / "breakdown.zst"
        comp = zstandard.ZstdCompressor(level=3).compressobj(size=-1)
        digest = hashlib.sha256()
        t_read = t_zstd = t_sha = t_write = 0.0
        stored = 0
        t0 = time.perf_counter()
        with open(plain, "rb") as src, open(sink, "wb") as dst:
            while True:
                a = time.perf_counter()
                chunk = src.read(1 << 20)
                b = time.perf_counter()
                t_read += b - a
                if not chunk:
                    data = comp.flush()
                else:
                    data = comp.compress(chunk)
                c = time.perf_counter()
                t_zstd += c - b
                if data:
                    digest.update(data)
                    d = time.perf_counter()
                    t_sha += d - c
                    dst.write(data)
                    t_write += time.perf_counter() - d
                    stored += len(data)
                if not chunk:
                    break
            a = time.perf_counter()
            dst.flush()
            os.fsync(dst.fileno())
            t_fsync = time.perf_counter() - a
        total = time.perf_counter() - t0
        sink.unlink()
        out["python_stages_one_thread"] = {
            "read_file_seconds": round(t_read, 3), "zstd_level3_seconds": round(t_zstd, 3),
            "sha256_seconds": round(t_sha, 3), "write_seconds": round(t_write, 3),
            "fsync_seconds": round(t_fsync, 3), "total_seconds": round(total, 3),
            "stored_bytes": stored,
            "zstd_mb_s": round(out["dump_bytes"] / max(t_zstd, 1e-9) / MB, 1),
            "sha256_mb_s": round(stored / max(t_sha, 1e-9) / MB, 1),
        }

        # Our real functions without Prefect: write_dump (file chunks -> store), and
        # postgres.dump consumed to nothing (pg_dump -> pipe -> Python reads of 1 MiB).
        from tasks import backups, postgres
        from tasks.config import load_settings
        from tasks.storage import LocalStore, LocalStoreConfig

        scratch = LocalStore("breakdown", LocalStoreConfig(path=self.work / "breakdown-store"))

        def file_chunks() -> Any:
            with open(plain, "rb") as f:
                while data := f.read(postgres.CHUNK):
                    yield data

        t0 = time.perf_counter()
        backups.write_dump(scratch, "x/dump.zst", file_chunks(), 3, None)
        out["write_dump_from_file_seconds"] = round(time.perf_counter() - t0, 3)
        shutil.rmtree(self.work / "breakdown-store", ignore_errors=True)

        settings = load_settings()
        database = settings.database("bench")
        # The exact row counts the dump task reads in the same snapshot, alone.
        self.settle()
        t0 = time.perf_counter()
        with postgres.connect(database) as conn:
            postgres.read_state(conn, database.config.schemas)
        out["exact_row_counts_seconds"] = round(time.perf_counter() - t0, 3)

        self.settle()
        meter = CpuMeter()
        t0 = time.perf_counter()
        n = 0
        with postgres.dump(database) as stream:
            for chunk in stream.chunks:
                n += len(chunk)
        out["postgres_dump_stream_to_nothing"] = {
            "seconds": round(time.perf_counter() - t0, 3), "bytes": n, "cpu_busy_share": meter.stop()}

        scratch = LocalStore("breakdown", LocalStoreConfig(path=self.work / "breakdown-store"))
        self.settle()
        meter = CpuMeter()
        t0 = time.perf_counter()
        with postgres.dump(database) as stream:
            backups.write_dump(scratch, "x/dump.zst", stream.chunks, 3, None)
        out["dump_and_write_dump_no_prefect"] = {
            "seconds": round(time.perf_counter() - t0, 3), "cpu_busy_share": meter.stop()}
        shutil.rmtree(self.work / "breakdown-store", ignore_errors=True)

        run = self.run_pipeline("pg_restore --list", [
            [self.tool("pg_restore"), "--list", str(plain)]])
        out["pg_restore_list"] = run
        b = out
        say(f"  pg_dump alone {b['pg_dump_to_devnull']['seconds']:.1f} s; zstd CLI alone "
            f"{b['zstd_cli_file_to_devnull']['seconds']:.1f} s; Python zstd "
            f"{b['python_stages_one_thread']['zstd_level3_seconds']:.1f} s + sha256 "
            f"{b['python_stages_one_thread']['sha256_seconds']:.1f} s + write "
            f"{b['python_stages_one_thread']['write_seconds']:.1f} s + fsync "
            f"{b['python_stages_one_thread']['fsync_seconds']:.1f} s")
        say(f"  exact row counts alone {b['exact_row_counts_seconds']:.1f} s; "
            f"postgres.dump -> nothing {b['postgres_dump_stream_to_nothing']['seconds']:.1f} s; "
            f"postgres.dump + write_dump without Prefect "
            f"{b['dump_and_write_dump_no_prefect']['seconds']:.1f} s")
        return out

    def measure_memory(self, db: dict[str, Any], quarter_mb: float) -> dict[str, Any]:
        say("peak RSS of the dump task (tasks.backup_tasks.dump_to_store.fn in a child process)...")
        full = self.rss_child("bench", db["size_bytes"])
        qdb = self.build_database("bench_q", f"{self.prefix}_q", quarter_mb)
        self.write_config()
        quarter = self.rss_child("bench_q", qdb["size_bytes"])
        self.drop_db(qdb["name"])
        return {
            "how": "child process runs tasks.backup_tasks.dump_to_store.fn (no Prefect server); "
                   "peak = the child's own VmHWM from /proc/self/status (pg_dump excluded)",
            "full": full, "quarter": quarter, "quarter_database": qdb,
            "ratio_full_to_quarter": round(full["peak_rss_mib"] / quarter["peak_rss_mib"], 3),
        }

    def rss_child(self, key: str, size: int) -> dict[str, Any]:
        assert self.work is not None
        store_dir = self.work / "rss-store"
        say(f"  dump of '{key}' ({size / MB:,.0f} MB) in a child process...")
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()),
                                     "--rss-child", key, str(store_dir)],
                                    stdout=out, stderr=err, env=dict(os.environ))
            self.procs.append(proc)
            self._wait(proc)
            out.seek(0)
            err.seek(0)
            text, errors = out.read().decode(errors="replace"), err.read()
        shutil.rmtree(store_dir, ignore_errors=True)
        if proc.returncode != 0:
            raise BenchError(f"memory child for '{key}' failed (exit {proc.returncode}): "
                             f"{first_line(errors)}")
        data = json.loads(text.strip().splitlines()[-1])
        data["db_size_bytes"] = size
        say(f"  peak RSS {data['peak_rss_mib']:.0f} MiB (after imports {data['rss_after_imports_mib']:.0f} "
            f"MiB), dump {data['seconds']:.1f} s")
        return data

    # ---------------------------------------------------------------- reporting

    def flow_timeline(self, key: str) -> dict[str, float]:
        """Step -> seconds from the run report artifact the flow just published."""
        try:
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                arts = client.request("POST", "/artifacts/filter", json={
                    "artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC",
                    "limit": 1, "offset": 0}).json()
            text = arts[0]["data"]
        except Exception:  # noqa: BLE001 - a breakdown is a courtesy
            return {}
        steps = {}
        for m in re.finditer(r"^\| (.+?) \| \d\d:\d\d:\d\d \| ([0-9.]+) \| (\w+) \|", text, re.MULTILINE):
            steps[m.group(1)] = float(m.group(2))
        return steps

    def table(self) -> list[dict[str, Any]]:
        r = self.results
        b, rs, ref, mem = r["backup"], r["restore"], r["reference"], r["memory"]
        rows = [
            ("backup throughput (dump task)", f"{b['ours_throughput_mb_s']:.1f} MB/s",
             f"{b['raw_throughput_mb_s']:.1f} MB/s", b["throughput_ratio"], "backup_throughput_ratio"),
            ("backup time (dump task)", f"{b['ours_dump_task_seconds']:.1f} s",
             f"{b['raw_seconds']:.1f} s", round(b["ours_dump_task_seconds"] / b["raw_seconds"], 3), None),
            ("backup flow wall time", f"{b['ours_flow_seconds']:.1f} s",
             f"{b['raw_seconds']:.1f} s", round(b["ours_flow_seconds"] / b["raw_seconds"], 3), None),
            ("backup flow throughput", f"{b['ours_flow_throughput_mb_s']:.1f} MB/s",
             f"{b['raw_throughput_mb_s']:.1f} MB/s", b["flow_throughput_ratio"], None),
            ("restore: time to verified vs pg_restore -j2", f"{rs['ours_time_to_verified_seconds']:.1f} s",
             f"{rs['raw_seconds']:.1f} s", rs["ratio_ttv"], "restore_vs_pg_restore"),
            ("restore: flow wall time vs pg_restore -j2", f"{rs['ours_flow_seconds']:.1f} s",
             f"{rs['raw_seconds']:.1f} s", rs["ratio_flow"], None),
            ("restore: our pg_restore step vs pg_restore -j2", f"{rs['ours_restore_seconds']:.1f} s",
             f"{rs['raw_seconds']:.1f} s", round(rs["ours_restore_seconds"] / rs["raw_seconds"], 3), None),
            ("restore: time to verified vs gunzip | psql", f"{rs['ours_time_to_verified_seconds']:.1f} s",
             f"{ref['restore_seconds']:.1f} s", round(rs["ours_time_to_verified_seconds"]
                                                        / ref["restore_seconds"], 3),
             "restore_vs_reference"),
            ("peak RSS of the backup, full size", f"{mem['full']['peak_rss_mib']:.0f} MiB", "-",
             mem["full"]["peak_rss_mib"], "rss_full_mib"),
            ("peak RSS of the backup, quarter size", f"{mem['quarter']['peak_rss_mib']:.0f} MiB", "-",
             mem["quarter"]["peak_rss_mib"], "rss_quarter_mib"),
            ("peak RSS full / quarter (flat)", f"{mem['full']['peak_rss_mib']:.0f} MiB",
             f"{mem['quarter']['peak_rss_mib']:.0f} MiB", mem["ratio_full_to_quarter"], "rss_flatness"),
        ]
        out = []
        for measure, ours, base, ratio, target in rows:
            row: dict[str, Any] = {"measure": measure, "ours": ours, "baseline": base, "ratio": ratio,
                                   "target": None, "pass": None}
            if target:
                op, limit = TARGETS[target]
                ok = {">=": ratio >= limit, "<=": ratio <= limit, "<": ratio < limit}[op]
                unit = " MiB" if target.startswith("rss_") and target != "rss_flatness" else ""
                row.update(target=f"{op} {limit:g}{unit}", target_key=target, passed=ok,
                           **{"pass": "PASS" if ok else "FAIL"})
            out.append(row)
        return out

    def print_results(self) -> None:
        r = self.results
        db = r["database"]
        say("")
        say(f"Backup and restore, {db['size_bytes'] / MB:,.0f} MB database "
            f"({db['total_rows']:,} rows), PostgreSQL {self.server_version}, "
            f"{r['machine']['nproc']} CPUs, repeat={r['repeat']}")
        headers = ["measure", "ours", "baseline", "ratio", "target", "pass/fail"]
        cells = []
        for row in r["table"]:
            ratio = row["ratio"]
            is_mib = row.get("target_key", "").startswith("rss_") and row.get("target_key") != "rss_flatness"
            cells.append([row["measure"], row["ours"], row["baseline"],
                          "-" if is_mib else f"{ratio:.3f}",
                          row["target"] or "-", row["pass"] or "-"])
        widths = [max(len(str(c[i])) for c in cells + [headers]) for i in range(len(headers))]
        align = ["<", ">", ">", ">", "<", "<"]

        def line(values: list[str]) -> str:
            return "| " + " | ".join(f"{v:{a}{w}}" for v, a, w in zip(values, align, widths)) + " |"

        say(line(headers))
        say("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for c in cells:
            say(line(c))
        say("ratio: throughput ours/raw for throughput rows; time ours/baseline for time rows.")

        bk = r["breakdown"]
        py = bk["python_stages_one_thread"]
        ours_b = r["backup"]["our_runs"][-1]
        ours_r = r["restore"]["our_runs"][-1]
        say("")
        say("Where the time goes")
        say(f"  backup: pg_dump -Fc -Z0 alone {bk['pg_dump_to_devnull']['seconds']:.1f} s; "
            f"zstd -3 CLI alone {bk['zstd_cli_file_to_devnull']['seconds']:.1f} s; "
            f"our Python stages alone {py['total_seconds']:.1f} s (zstd {py['zstd_level3_seconds']:.1f}, "
            f"sha256 {py['sha256_seconds']:.1f}, write {py['write_seconds']:.1f}, "
            f"fsync {py['fsync_seconds']:.1f})")
        say(f"          exact row counts alone {bk['exact_row_counts_seconds']:.1f} s; "
            f"postgres.dump read by Python, discarded "
            f"{bk['postgres_dump_stream_to_nothing']['seconds']:.1f} s; dump + write_dump without "
            f"Prefect {bk['dump_and_write_dump_no_prefect']['seconds']:.1f} s; "
            f"flow steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in ours_b["steps"].items()))
        say("  restore: flow steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in ours_r["steps"].items()))
        if not ours_r["amcheck"]:
            say("  note: pg_amcheck/amcheck is not available on this server, so time to verified "
                "excludes it (the flow skips it)")
        load = r["machine"]["loadavg_at_start"]
        if load and load[0] > 0.5:
            say(f"  note: the machine was not idle at the start (load {load[0]:.2f}); "
                "figures may be noisy, consider --repeat 5")

    # ---------------------------------------------------------------- context

    def machine(self) -> dict[str, Any]:
        model = ""
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        mem = 0
        with contextlib.suppress(OSError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal"):
                    mem = int(line.split()[1]) // 1024
        load: list[float] = []
        with contextlib.suppress(OSError):
            load = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
        return {"nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
                "loadavg_at_start": load,
                "cpu_model": model, "mem_total_mib": mem, "kernel": platform.release(),
                "platform": platform.platform(), "hostname": platform.node()}

    def versions(self) -> dict[str, Any]:
        import zstandard

        def pkg(name: str) -> str:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                return ""

        return {
            "postgresql_server": self.server_version,
            "bin_dir": str(self.bin_dir),
            "pg_dump": version_of([self.tool("pg_dump"), "--version"]),
            "pg_restore": version_of([self.tool("pg_restore"), "--version"]),
            "psql": version_of([self.tool("psql"), "--version"]),
            "zstd_cli": version_of([ZSTD, "--version"]),
            "gzip": version_of([GZIP, "--version"]),
            "python": platform.python_version(),
            "python_zstandard": zstandard.__version__,
            "libzstd_in_python": ".".join(map(str, zstandard.ZSTD_VERSION)),
            "prefect": pkg("prefect"), "psycopg": pkg("psycopg"), "pgserver": pkg("pgserver"),
            "prefect_runbooks": pkg("prefect-runbooks"),
        }


# --------------------------------------------------------------------------- memory child


def rss_child(key: str, store_dir: str) -> int:
    """Run in a child process: the dump task alone (no Prefect server), then print its
    memory figures as one JSON line."""
    start = proc_status()
    from tasks import backups
    from tasks.backup_tasks import dump_to_store
    from tasks.config import load_settings
    from tasks.storage import LocalStore, LocalStoreConfig

    db = load_settings().database(key)
    store = LocalStore("rss", LocalStoreConfig(path=Path(store_dir)))
    after = proc_status()
    t0 = time.perf_counter()
    manifest = dump_to_store.fn(db, store, backups.new_backup_id(key), None)
    seconds = time.perf_counter() - t0
    end = proc_status()
    print(json.dumps({
        "peak_rss_mib": round(end["VmHWM"] / 1024, 1),
        "rss_at_start_mib": round(start["VmRSS"] / 1024, 1),
        "rss_after_imports_mib": round(after["VmRSS"] / 1024, 1),
        "peak_after_imports_mib": round(after["VmHWM"] / 1024, 1),
        "rss_at_end_mib": round(end["VmRSS"] / 1024, 1),
        "pipeline_increment_mib": round((end["VmHWM"] - after["VmRSS"]) / 1024, 1),
        "seconds": round(seconds, 3),
        "dump_bytes": manifest.dump_bytes, "stored_bytes": manifest.stored_bytes,
    }), flush=True)
    return 0


# --------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/backup_restore.py",
        description="Benchmark our backup/restore-test flows against pg_dump|zstd, "
                    "pg_restore -j2 and gunzip|psql; writes benchmarks/results/backup_restore.json.")
    p.add_argument("--size-mb", type=float, default=None,
                   help="database size to build, MB as in demo.sample_data (default 1024; 100 with --quick)")
    p.add_argument("--quick", action="store_true", help="~100 MB smoke run")
    p.add_argument("--pg-dsn", help="admin DSN of an existing server (default: embedded pgserver)")
    p.add_argument("--bin-dir", help="PostgreSQL client tools (default: pgserver's bundled PostgreSQL 16)")
    p.add_argument("--repeat", type=int, default=3,
                   help="run each backup and restore comparison N times, interleaved; medians are reported")
    p.add_argument("--work-dir", help="parent directory for dumps and the store (default: system temp)")
    p.add_argument("--json", help=f"where to write the results (default: {DEFAULT_RESULTS})")
    p.add_argument("--verbose", action="store_true", help="show Prefect's logs and full tracebacks")
    p.add_argument("--rss-child", nargs=2, metavar=("DATABASE", "STORE_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.size_mb is not None and args.size_mb < 8:
        p.error("--size-mb must be at least 8")
    return args


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_environment(args.verbose)
    if args.rss_child:
        return rss_child(*args.rss_child)
    signal.signal(signal.SIGTERM, _sigterm)
    from flows._common import tidy_logs

    tidy_logs()  # no temporary-server chatter under --verbose either
    bench = Bench(args)
    try:
        bench.run()
        return 0
    except KeyboardInterrupt:
        say("\ninterrupted: cleaning up...")
        return 130
    except BenchError as exc:
        say(f"error: {exc}")
        return 1
    except Exception as exc:  # noqa: BLE001 - one line unless --verbose
        if args.verbose:
            traceback.print_exc()
        say(f"error: {type(exc).__name__}: {first_line(str(exc))}")
        return 1
    finally:
        bench.cleanup()


if __name__ == "__main__":
    sys.exit(main())
