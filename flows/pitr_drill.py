"""Runbook: the RPO drill. Write a marker every second, kill the primary and lose its
data directory, restore to the latest archived WAL, count the markers lost."""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import BaseModel

from flows._common import announce
from flows.pitr_restore import restore_and_check, switch_production
from tasks import pitr, pitr_switch
from tasks.config import load_settings
from tasks.errors import ConfigError
from tasks.notify import Severity
from tasks.pitr import PitrError, Target
from tasks.pitr_checks import MarkerWriter, count_lost
from tasks.report import RunReport, first_line, utc


class PitrDrillResult(BaseModel):
    database: str
    markers_written: int
    markers_lost: int
    rpo_seconds: float
    rpo_target_seconds: int
    met: bool
    recovered_to: datetime | None
    rto_seconds: float  # from the kill to production answering with the restored data


@flow(name="pitr-drill", log_prints=True)
def pitr_drill(database: str, write_seconds: int = 30) -> PitrDrillResult:
    """Measure the RPO of continuous archiving the hard way, on a staging cluster.

    Steps: make sure a backup set exists (a full one if not); insert a marker row every
    second for `write_seconds`; kill the primary (`pg_ctl stop -m immediate`) and move
    its data directory away, as a lost disk would; restore to the latest archived WAL
    and put it in production's place; count the markers that did not come back: the
    seconds of writes between the newest recovered marker and the newest committed one
    is the measured RPO, reported against `rpo_target_seconds`. The moved-away data
    directory is removed after a successful drill, and put back if the restore fails.
    Refused unless the cluster's config says `drill = true`.

    Args:
        database: The database target (a staging cluster with `drill = true` in its pitr section).
        write_seconds: How long the writer runs before the kill.
    """
    settings = load_settings()
    db = settings.database(database)
    stanza = settings.stanza(database)
    cfg = stanza.cfg
    if not cfg.drill:
        raise ConfigError(f"pitr-drill kills the cluster of {database!r}; it runs only where "
                          f"[databases.{database}.pitr] says drill = true (a staging or test cluster)")
    bin_dir = pitr.find_pg_bin(cfg, db.config.bin_dir)
    with RunReport("PITR drill", database) as run:
        try:
            with pitr_switch.holding(run, db, cfg):
                with run.step("backup set to restore from") as step:
                    sets = stanza.info(1).usable(1)
                    made = sets[-1] if sets else pitr.backup(stanza, "full", 1)
                    step.detail = f"{made.label} ({made.type}, ended {utc(made.stopped)})" + (
                        "" if sets else "; taken now, none existed")
                writer = MarkerWriter(db.dsn)
                with run.step("write markers") as step, writer:
                    time.sleep(write_seconds)
                    with run.step("kill the primary and lose its data directory") as kill:
                        killed_at = time.monotonic()
                        lost_dir = _kill(cfg, bin_dir)
                        kill.detail = f"pg_ctl stop -m immediate; data directory moved to {lost_dir}"
                    writer.stop()
                    step.detail = f"{len(writer.committed)} markers committed, one a second"
                try:
                    done = restore_and_check(run, db, stanza, Target(kind="latest"), promote=True)
                    switch_production(run, db, stanza, done.restored)
                except BaseException:
                    _put_back(run, cfg, bin_dir, lost_dir)
                    raise
                rto = time.monotonic() - killed_at
                with run.step("count lost markers") as step:
                    lost, rpo, newest = count_lost(db.dsn, writer.committed)
                    step.detail = (f"{lost} of {len(writer.committed)} lost; newest recovered marker "
                                   f"{utc(newest, 'none')}")
                with run.step("remove the lost data directory") as step:
                    shutil.rmtree(lost_dir)
                    step.detail = str(lost_dir)
            met = rpo <= cfg.rpo_target_seconds
            run.figure("Measured RPO", f"{rpo:.1f} s ({lost} markers lost); target {cfg.rpo_target_seconds} s: "
                                       + ("met" if met else "MISSED"))
            run.figure("Measured RTO (kill to production verified)", f"{rto:.1f} s")
            run.outcome = "RPO met" if met else "RPO missed"
            print(f"PITR drill of {database}: lost {lost} markers, RPO {rpo:.1f} s "
                  f"(target {cfg.rpo_target_seconds} s, {'met' if met else 'MISSED'}); back in {rto:.1f} s")
            announce(settings, run, Severity.INFO if met else Severity.HIGH,
                     f"RPO drill: {rpo:.1f} s of writes lost (target {cfg.rpo_target_seconds} s).")
            return PitrDrillResult(database=database, markers_written=len(writer.committed), markers_lost=lost,
                                   rpo_seconds=rpo, rpo_target_seconds=cfg.rpo_target_seconds, met=met,
                                   recovered_to=done.check.recovered_to, rto_seconds=rto)
        except Exception as exc:
            announce(settings, run, Severity.HIGH, f"RPO drill of {database} failed.", failed=exc)
            raise


def _kill(cfg: pitr.PitrConfig, bin_dir: Path) -> Path:
    """Kill the primary and move its data directory away; recorded first, so that a drill
    killed in turn leaves a record the next PITR run settles (it puts the directory back)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    lost = cfg.data_dir.with_name(f"{cfg.data_dir.name}.drill-lost-{stamp}")
    pitr_switch.begin(cfg, pitr_switch.SwitchRecord(kept=str(lost)))
    proc = pitr.pg_ctl(cfg, bin_dir, "stop", "-m", "immediate", "-D", str(cfg.data_dir))
    if proc.returncode != 0:
        pitr_switch.end(cfg)
        raise PitrError(f"could not kill the cluster in {cfg.data_dir}: {(proc.stderr or proc.stdout).strip()}")
    cfg.data_dir.rename(lost)
    return lost


def _put_back(run: RunReport, cfg: pitr.PitrConfig, bin_dir: Path, lost_dir: Path) -> None:
    """A failed drill leaves the cluster as it was: its own data directory, started."""
    try:
        if not cfg.data_dir.exists():
            lost_dir.rename(cfg.data_dir)
            pitr.control(cfg, "start", bin_dir)
            pitr_switch.end(cfg)
            run.figure("Undone", f"the drill failed: {cfg.data_dir} is back and started (crash recovery)")
    except Exception as exc:  # noqa: BLE001 - the drill's own error is the one raised
        get_run_logger().error("could not put %s back: %s", lost_dir, first_line(exc))
