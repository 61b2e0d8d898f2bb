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


class SwitchRecord(BaseModel):
    run: str = Field(default_factory=_this_run)  # the flow run that switches
    started_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    kept: str  # where production's own data directory is (or will be) kept
    restored: str | None = None  # the restored data directory that replaces it


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
    directory never left: start it. Moved aside but nothing in its place: put it back and
    start it. The restored cluster moved in: the approved switch is finished (started, a
    primary) and production's old directory stays kept. The record stays when this fails."""
    record = read(cfg)
    if record is None:
        return []
    who = f"the switch of run {record.run} (started {utc(record.started_at)})"
    kept = Path(record.kept)
    restored = Path(record.restored) if record.restored else None
    done: list[str] = []
    if not cfg.data_dir.exists():
        if not kept.exists():
            raise PitrError(f"{who} left neither {cfg.data_dir} nor {kept}; nothing was changed: "
                            f"find production's data directory by hand, then remove {record_path(cfg)}")
        kept.rename(cfg.data_dir)
        done.append(f"{who} had moved production's data directory aside: put it back from {kept}")
    elif restored is not None and not restored.exists() and kept.exists():
        done.append(f"{who} had moved the restored cluster in: finished it (production's old data "
                    f"directory is kept in {kept})")
    else:
        done.append(f"{who} had not switched: production's own data directory is unchanged"
                    + (f"; the restored cluster is kept in {restored}" if restored and restored.exists() else ""))
    if not running(cfg, bin_dir):
        pitr.control(cfg, "start", bin_dir)
        pitr.wake_checkpointer(pitr.cluster_dsn(dsn, cfg.port))
        done.append(f"started production on port {cfg.port}")
    with psycopg.connect(pitr.cluster_dsn(dsn, cfg.port), autocommit=True, connect_timeout=30) as conn:
        if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:  # type: ignore[index]
            raise PitrError(f"production came back still in recovery after settling {who}; "
                            f"the record {record_path(cfg)} stays")
    end(cfg)
    return done


def describe(cfg: PitrConfig) -> str | None:
    """One line for `runbooks pitr status` while a dead run's switch waits to be settled."""
    record = read(cfg)
    if record is None:
        return None
    return (f"the switch of run {record.run} (started {utc(record.started_at)}) did not finish; the next PITR "
            f"run or `runbooks recovery cleanup` settles it (production's directory kept: {record.kept}; "
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
