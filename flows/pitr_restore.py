"""Runbook: restore a PostgreSQL cluster to a point in time (pgBackRest), verify it, and
switch production to it or leave it beside production for a person to copy data from."""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from prefect import flow, get_run_logger
from pydantic import BaseModel

from flows._common import announce
from tasks import pitr, pitr_switch
from tasks.approval import WAIT_SECONDS, NotApproved, approve
from tasks.config import load_settings
from tasks.notify import Severity
from tasks.pitr import Restored, RestorePlan, Stanza, Target
from tasks.pitr_checks import ClusterCheck, amcheck_cluster, check_cluster
from tasks.postgres import Database
from tasks.report import RunReport, first_line, human_bytes, utc


class PitrRestoreResult(BaseModel):
    database: str
    target: str
    backup_set: str
    recovered_to: datetime | None
    data_dir: str
    port: int
    switched: bool
    promoted: bool
    rows: int
    time_to_verified_seconds: float
    previous_data_dir: str | None = None


@flow(name="pitr-restore", log_prints=True)
def pitr_restore(database: str, target_time: str | None = None, restore_point: str | None = None,
                 promote: bool = False, switch: bool = False, backup_set: str | None = None,
                 repo: int = 1, auto_approve: bool = False,
                 approval_timeout_minutes: float = WAIT_SECONDS / 60) -> PitrRestoreResult:
    """Restore the database's cluster to a second, a restore point or the latest WAL.

    Use: data was deleted or corrupted at a known time (restore to just before it and
    copy the rows back from the side cluster), or the primary is lost (restore to the
    latest WAL and switch). Steps:
      1. plan: the backup set that ended before the target, and every WAL segment from
         it to the target present in the archive; a target before the oldest backup or
         after the newest archived WAL is refused, naming both;
      2. pgBackRest restore into a new data directory beside production's;
      3. start it on a free port, archiving nothing, and wait for recovery: paused at the
         target (read-only) unless `promote`; the latest WAL always promotes;
      4. verify: recovered last transaction not after the target, row counts of every
         database, the configured query (the RTO clock stops here); then pg_amcheck;
      5. `switch`: after approval, promote, stop production, rename its data directory
         to DATA_DIR.replaced-TIME (kept), move the restored one into its place and
         start it on production's port; otherwise it stays running as a side cluster.

    Args:
        database: The database target (its pitr section in runbooks.toml names the cluster).
        target_time: Recover to this second, with its zone (2026-12-07T10:15:00+00:00);
            empty: the end of the archived WAL.
        restore_point: Recover to a restore point made with pg_create_restore_point.
        promote: End recovery at the target (the side cluster becomes writable).
        switch: Replace production with the restored cluster (after approval).
        backup_set: Restore this pgBackRest set (e.g. 20261207-011804F); empty: chosen.
        repo: The pgBackRest repository to restore from (1: the first in the config).
        auto_approve: Switch without waiting for a person (drills).
        approval_timeout_minutes: How long a switch waits for approval; unanswered or
            declined, production is unchanged and the restored cluster stays beside it.
    """
    settings = load_settings()
    db = settings.database(database)
    stanza = settings.stanza(database)
    target = Target.parse(target_time, restore_point)
    with RunReport("PITR restore", database) as run:
        try:
            with pitr_switch.holding(run, db, stanza.cfg):
                done = restore_and_check(run, db, stanza, target, promote or switch, repo, backup_set)
                restored, check = done.restored, done.check
                previous = None
                if switch:
                    try:
                        approve(run, f"switch {database} to the cluster restored to {utc(check.recovered_to)}",
                                evidence=evidence(run), auto=auto_approve,
                                wait_seconds=max(1, int(approval_timeout_minutes * 60)),
                                before_wait=lambda: announce(settings, run, Severity.HIGH,
                                                             f"PITR restore of {database} waits for approval "
                                                             "to switch production."))
                    except NotApproved:
                        run.figure("Side cluster", f"port {restored.port}, data directory {restored.data_dir} "
                                                   "(not switched: stop and remove it when done)")
                        raise
                    previous = switch_production(run, db, stanza, restored)
                    data_dir, port = stanza.cfg.data_dir, stanza.cfg.port
                else:
                    data_dir, port = restored.data_dir, restored.port
                    run.figure("Side cluster", f"port {port}, data directory {data_dir} (stop and remove "
                                               "it when done)")
            print(f"PITR restore of {database}: recovered to {utc(check.recovered_to)}, "
                  f"verified in {done.verified_seconds:.1f} s"
                  + ("; production now runs it" + (f" (old data kept in {previous})" if previous else "")
                     if switch else
                     f"; side cluster on port {port}"))
            run.outcome = "switched" if switch else "restored beside production"
            announce(settings, run, Severity.INFO, f"{database} restored to {target.describe()}.")
            return PitrRestoreResult(
                database=database, target=target.describe(), backup_set=done.plan.backup.label,
                recovered_to=check.recovered_to, data_dir=str(data_dir), port=port, switched=switch,
                promoted=promote or switch, rows=check.rows, time_to_verified_seconds=done.verified_seconds,
                previous_data_dir=str(previous) if previous else None)
        except Exception as exc:
            announce(settings, run, Severity.HIGH, f"PITR restore of {database} failed; production is "
                     "unchanged unless the report says otherwise.", failed=exc)
            raise


@dataclass
class Restoration:
    plan: RestorePlan
    restored: Restored
    check: ClusterCheck
    verified_seconds: float  # from the start of planning to verified: the measured RTO


def restore_and_check(run: RunReport, db: Database, stanza: Stanza, target: Target, promote: bool,
                      repo: int = 1, backup_set: str | None = None, scratch: bool = False) -> Restoration:
    """Plan, restore, start and verify (steps 1-4 above); a failure stops the restored
    cluster and says where its data directory is (removed when `scratch`)."""
    cfg = stanza.cfg
    bin_dir = pitr.find_pg_bin(cfg, db.config.bin_dir)
    t0 = time.monotonic()
    with run.step("plan: backup set and WAL") as step:
        plan = pitr.plan_restore(stanza, target, repo, backup_set)
        step.detail = (f"{plan.backup.label} ({plan.backup.type}, ended {utc(plan.backup.stopped)}); "
                       f"{plan.segments_checked} WAL segments present up to {plan.newest_wal}")
    describe_plan(run, plan)
    parent = cfg.restore_dir or cfg.data_dir.parent
    kind = "restoretest" if scratch else "pitr"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    restored = Restored(parent / f"{cfg.data_dir.name}.{kind}-{stamp}", pitr.free_port(),
                        parent / f"{cfg.data_dir.name}.{kind}-{stamp}.log")
    started = False
    try:
        with run.step("pgbackrest restore") as step:
            step.detail = f"{plan.backup.label} into {restored.data_dir}"
            r0 = time.monotonic()
            pitr.restore(stanza, plan, restored.data_dir, promote)
            run.figure("Restore (pgBackRest)", f"{time.monotonic() - r0:.1f} s, {human_bytes(plan.backup.size)}")
        with run.step("start and recover") as step:
            step.detail = f"port {restored.port}, archiving off"
            r0 = time.monotonic()
            started = True
            try:
                pitr.start_restored(cfg, bin_dir, restored, archive=False)
                state = pitr.wait_recovered(cfg, restored, db.dsn,
                                            expect_paused=target.kind != "latest" and not promote)
            except pitr.TargetNotReached:
                state, how = _past_the_archive(cfg, bin_dir, restored, db.dsn, promote)
                step.detail += f"; {how}"
            step.detail += (f"; recovered to {utc(state['last_replayed_xact'])}, "
                            + ("paused at the target (read-only)" if state["paused"] else
                               f"promoted on timeline {state['timeline']}"))
            run.figure("WAL replay", f"{time.monotonic() - r0:.1f} s")
        with run.step("verify restored cluster") as step:
            check = check_cluster(db, cfg, restored, state, target)
            step.detail = (f"{len(check.databases)} databases, {check.tables} tables, {check.rows} rows"
                           + (f"; query {check.query}" if check.query else ""))
        verified = time.monotonic() - t0  # the data is verified: the RTO clock stops (as in restore-test)
        with run.step("pg_amcheck") as step:
            found = amcheck_cluster(db, restored, state["in_recovery"])
            step.detail = ", ".join(f"{k}: {v}" for k, v in found.items())
    except BaseException:
        failing = sys.exc_info()[1]
        if started:
            stop_quietly(cfg, bin_dir, restored.data_dir)
        if scratch:
            shutil.rmtree(restored.data_dir, ignore_errors=True)
        elif restored.data_dir.exists():
            run.figure("Restored data directory", f"{restored.data_dir} (kept for inspection; "
                                                  f"server log {restored.log_file})")
        get_run_logger().warning("restore of %s failed: %s", db.name, first_line(failing) if failing else "")
        raise
    run.figure("Recovered to", utc(check.recovered_to, "no transaction replayed"))
    run.figure("Rows verified", f"{check.rows} in {check.tables} tables of {len(check.databases)} databases")
    run.figure("pg_amcheck (after the RTO clock)", ", ".join(f"{k}: {v}" for k, v in found.items()))
    run.figure("Time to verified (measured RTO)", f"{verified:.1f} s")
    return Restoration(plan, restored, check, verified)


def _past_the_archive(cfg: pitr.PitrConfig, bin_dir: Path, restored: Restored, dsn: str,
                      promote: bool) -> tuple[dict, str]:
    """Recovery reached the end of the archive before a commit after the target time
    (PostgreSQL stops at a time only on such a commit). If production still runs, its
    current segment is archived now and recovery tried once more with the target. If
    the archive still holds no commit after it, its end has exactly the target's data:
    recover to the end. (Should a later commit be archived in between, verification
    refuses the overshoot.)"""
    if pitr.archive_current_segment(dsn):
        try:
            pitr.start_restored(cfg, bin_dir, restored, archive=False)
            return (pitr.wait_recovered(cfg, restored, dsn, expect_paused=not promote),
                    "the archive ended before the target; production's current segment archived, recovered again")
        except pitr.TargetNotReached:
            pass
    pitr.drop_recovery_target(cfg, restored.data_dir)
    pitr.start_restored(cfg, bin_dir, restored, archive=False)
    return (pitr.wait_recovered(cfg, restored, dsn, expect_paused=False),
            "no transaction after the target in the archive, so recovered to its end (the same data) and promoted")


def describe_plan(run: RunReport, plan: RestorePlan) -> None:
    run.figure("Target", plan.target.describe())
    run.figure("Backup set", f"{plan.backup.label} ({plan.backup.type}, {human_bytes(plan.backup.repo_size)} "
                             f"in repo{plan.repo}, ended {utc(plan.backup.stopped)})")
    run.figure("Newest archived WAL", f"{plan.newest_wal} (archived {utc(plan.newest_wal_at)})")


def evidence(run: RunReport) -> list[str]:
    keys = ("Target", "Backup set", "Recovered to", "Rows verified", "Time to verified (measured RTO)")
    return [f"{k}: {run.figures[k]}" for k in keys if k in run.figures]


def switch_production(run: RunReport, db: Database, stanza: Stanza, restored: Restored) -> Path | None:
    """Promote the restored cluster and put it in production's place; production's data
    directory is renamed, never removed. A failure part-way puts the old one back."""
    cfg = stanza.cfg
    bin_dir = pitr.find_pg_bin(cfg, db.config.bin_dir)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    ongoing = pitr_switch.read(cfg)
    if ongoing:  # the drill's own, written before it moved production away
        kept = Path(ongoing.kept) if ongoing.kept else None
    elif cfg.data_dir.exists():
        kept = cfg.data_dir.with_name(f"{cfg.data_dir.name}.replaced-{stamp}")
    else:
        kept = None  # production's directory is already gone (a lost disk): nothing to keep
    moved_old = moved_new = False
    with run.step("switch production") as step:
        try:
            pitr_switch.begin(cfg, pitr_switch.SwitchRecord(kept=str(kept) if kept else None,
                                                            restored=str(restored.data_dir)))
            with psycopg.connect(restored.dsn(db.dsn, "postgres"), autocommit=True) as conn:
                if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:  # type: ignore[index]
                    conn.execute("SELECT pg_promote(true, 300)")
            pitr.stop_cluster(cfg, bin_dir, restored.data_dir)
            queued = pitr.mark_for_archive(cfg, bin_dir, restored.data_dir)
            pitr.drop_restored_conf(restored.data_dir)
            if (cfg.data_dir / "postmaster.pid").exists():
                pitr.control(cfg, "stop", bin_dir)
            if cfg.data_dir.exists() and kept is not None:
                cfg.data_dir.rename(kept)
                moved_old = True
            restored.data_dir.rename(cfg.data_dir)
            moved_new = True
            pitr_switch.start_production(cfg, bin_dir, db.dsn)
            pitr_switch.end(cfg)
        except BaseException:
            _undo_switch(run, cfg, bin_dir, restored, kept, moved_old, moved_new)
            raise
        step.detail = (f"production runs the restored cluster on port {cfg.port}; "
                       + (f"old data kept in {kept}; " if moved_old else "there was no old data directory; ")
                       + f"new timeline queued for the archive: {', '.join(queued) or 'nothing'}")
    run.figure("Previous data directory", f"{kept} (kept; remove it when satisfied)" if moved_old else "none")
    return kept if moved_old else None


def _undo_switch(run: RunReport, cfg: pitr.PitrConfig, bin_dir: Path, restored: Restored, kept: Path | None,
                 moved_old: bool, moved_new: bool) -> None:
    """Put production's own data directory back and start it (best effort, said in the report).
    The record says "undoing" first, so that a kill now is undone, not finished, by the next
    run. The drill's production directory is away before any switch: the drill puts it back."""
    log = get_run_logger()
    try:
        if (current := pitr_switch.read(cfg)) is not None:
            pitr_switch.begin(cfg, current.model_copy(update={"undoing": True}))
        if moved_new:
            stop_quietly(cfg, bin_dir, cfg.data_dir)
            cfg.data_dir.rename(restored.data_dir)
        if moved_old and kept is not None:
            kept.rename(cfg.data_dir)
        if cfg.data_dir.exists():
            started = not pitr_switch.running(cfg, bin_dir)
            if started:
                pitr.control(cfg, "start", bin_dir)
            pitr_switch.end(cfg)
            run.figure("Switch undone", f"production's data directory {cfg.data_dir} is back"
                       + (" and started" if started else ""))
        elif kept is None:
            pitr_switch.end(cfg)  # production's directory was gone before the switch: nothing to put back
    except Exception as exc:  # noqa: BLE001 - the first error is the one to report; say this one too
        log.error("could not undo the switch: %s; production's data is in %s (the next PITR run or "
                  "`runbooks recovery cleanup` retries)", first_line(exc), kept if moved_old else cfg.data_dir)


def stop_quietly(cfg: pitr.PitrConfig, bin_dir: Path, data_dir: Path) -> None:
    try:
        pitr.stop_cluster(cfg, bin_dir, data_dir, mode="fast")
    except Exception as exc:  # noqa: BLE001 - already failing; leave word in the log
        get_run_logger().warning("could not stop the cluster in %s: %s", data_dir, first_line(exc))
