"""A record of a cluster switch in progress, so that a killed run never leaves production
without its data directory or stopped.

A switch stops production, renames its data directory aside and moves the restored one
into its place; the drill also moves production's directory away before it restores.
Before the first of these steps the run writes `<data_dir>.switching.json` beside the
data directory (the switch is local to the host, as the directories are). The run
removes it once production runs again, switched or undone. Every PITR run holds the
cluster's `pitr` slot, so a record it finds at its start belongs to a run that died:
`settle` finishes or undoes that switch from what is on disk.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from pydantic import BaseModel, Field

from tasks import pitr
from tasks.concurrency import current_run, exclusive
from tasks.pitr import PitrConfig, PitrError
from tasks.postgres import Database
from tasks.report import RunReport, utc


def _this_run() -> str:
    run_id, run_name, _ = current_run()
    return run_name or run_id or f"pid {os.getpid()}"


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), None when it is gone:
    with the pid it names one process, even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class SwitchRecord(BaseModel):
    run: str = Field(default_factory=_this_run)  # the flow run that switches
    started_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    host: str = Field(default_factory=socket.gethostname)
    pid: int = Field(default_factory=os.getpid)
    pid_started: str | None = Field(default_factory=lambda: _process_start(os.getpid()))
    kept: str | None  # where production's own data directory is (or will be) kept; None: it was already gone
    restored: str | None = None  # the restored data directory that replaces it
    undoing: bool = False  # the switch failed and is being undone: settle undoes it too

    @property
    def who(self) -> str:
        return f"the switch of run {self.run} (started {utc(self.started_at)})"

    def writer_alive(self) -> bool:
        return (self.host == socket.gethostname() and self.pid_started is not None
                and _process_start(self.pid) == self.pid_started)


def record_path(cfg: PitrConfig) -> Path:
    return cfg.data_dir.with_name(f"{cfg.data_dir.name}.switching.json")


def read(cfg: PitrConfig) -> SwitchRecord | None:
    path = record_path(cfg)
    return SwitchRecord.model_validate_json(path.read_text()) if path.exists() else None


def begin(cfg: PitrConfig, record: SwitchRecord) -> None:
    """Write the record durably before the first change it describes."""
    path = record_path(cfg)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(record.model_dump_json(indent=2))
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    _sync_dir(path.parent)


def end(cfg: PitrConfig) -> None:
    record_path(cfg).unlink(missing_ok=True)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def running(cfg: PitrConfig, bin_dir: Path) -> bool:
    return pitr.pg_ctl(cfg, bin_dir, "status", "-D", str(cfg.data_dir), timeout=60).returncode == 0


def settle(cfg: PitrConfig, bin_dir: Path, dsn: str) -> list[str]:
    """Finish or undo the switch of a run that died; one line per thing done. Production's
    directory never left: start it. Moved aside with nothing in its place: put it back and
    start it. The restored cluster moved in: the approved switch is finished (started, a
    primary), production's old directory stays kept; unless the run was undoing a failed
    switch, which is then undone. The record stays when this fails."""
    record = read(cfg)
    if record is None:
        return []
    who = record.who
    if record.writer_alive():
        raise PitrError(f"{who} is still running as pid {record.pid} although its slot was freed; "
                        "its directories were not touched")
    kept = Path(record.kept) if record.kept else None
    restored = Path(record.restored) if record.restored else None
    moved_in = restored is not None and not restored.exists() and cfg.data_dir.exists()
    done: list[str] = []
    if moved_in and record.undoing:
        pitr.stop_cluster(cfg, bin_dir, cfg.data_dir)
        cfg.data_dir.rename(restored)  # type: ignore[arg-type]
        moved_in = False
        done.append(f"{who} was undoing a failed switch: moved the restored cluster back to {restored}")
    if moved_in:
        done.append(f"{who} had moved the restored cluster in: finished it"
                    + (f" (production's old data directory is kept in {kept})" if kept and kept.exists() else ""))
    elif not cfg.data_dir.exists():
        if kept is None:
            end(cfg)
            return [*done, f"{who} began with production's data directory already gone and moved nothing; "
                           f"the restored cluster is kept in {restored}"]
        if not kept.exists():
            raise PitrError(f"{who} left neither {cfg.data_dir} nor {kept}; nothing was changed: "
                            f"find production's data directory by hand, then remove {record_path(cfg)}")
        kept.rename(cfg.data_dir)
        done.append(f"{who} had moved production's data directory aside: put it back from {kept}")
    elif not done:
        done.append(f"{who} had not switched: production's own data directory is unchanged"
                    + (f"; the restored cluster is kept in {restored}" if restored and restored.exists() else ""))
    if not running(cfg, bin_dir):
        start_production(cfg, bin_dir, dsn)
        done.append(f"started production on port {cfg.port}")
    else:
        check_primary(cfg, dsn)
    end(cfg)
    return done


def start_production(cfg: PitrConfig, bin_dir: Path, dsn: str) -> None:
    """Start production with its own control, wake its checkpointer, and check that it is
    a primary (a switch or a settled one must not leave it in recovery)."""
    pitr.control(cfg, "start", bin_dir)
    pitr.wake_checkpointer(pitr.cluster_dsn(dsn, cfg.port))
    check_primary(cfg, dsn)


def check_primary(cfg: PitrConfig, dsn: str) -> None:
    with psycopg.connect(pitr.cluster_dsn(dsn, cfg.port), autocommit=True, connect_timeout=30) as conn:
        if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:  # type: ignore[index]
            raise PitrError("production came back still in recovery")


def describe(cfg: PitrConfig) -> str | None:
    """One line for `runbooks pitr status` while a dead run's switch waits to be settled."""
    record = read(cfg)
    if record is None:
        return None
    return (f"{record.who} did not finish; the next PITR "
            f"run or `runbooks recovery cleanup` settles it (production's directory kept: "
            f"{record.kept or 'none, it was already gone'}; "
            f"restored: {record.restored or 'none yet'})")


@contextmanager
def holding(run: RunReport | None, db: Database, cfg: PitrConfig, say: Callable[[str], None] = print,
            wait_seconds: float = 6 * 3600) -> Iterator[None]:
    """The cluster's `pitr` slot, which every PITR run holds. A switch record found under
    it belongs to a run that died: it is settled first (a step of `run`'s report, or lines
    to `say`)."""
    with exclusive("pitr", db.name, wait_seconds=wait_seconds):
        if read(cfg) is not None:
            bin_dir = pitr.find_pg_bin(cfg, db.config.bin_dir)
            if run is None:
                for line in settle(cfg, bin_dir, db.dsn):
                    say(line)
            else:
                with run.step("settle a dead run's switch") as step:
                    step.detail = "; ".join(settle(cfg, bin_dir, db.dsn))
        yield
