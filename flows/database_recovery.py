"""Runbook 2: recover a database from its newest verified backup.

The reference stops the service, restores, verifies and restarts by hand (30-45 minutes
of outage). Here the restore and its verification happen while the service still runs;
the outage is only the swap: stop writes, two renames in one transaction, start again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal

from prefect import flow, get_run_logger
from psycopg import sql
from pydantic import BaseModel

from flows._common import announce
from tasks import backups, pitr_switch, postgres, recovery
from tasks.approval import WAIT_SECONDS, approve
from tasks.backup_tasks import (SpooledDump, create_scratch, drop_scratch, fail_verification, fetch_and_check,
                                restore_into_scratch, verify_restored)
from tasks.backups import Manifest
from tasks.concurrency import exclusive
from tasks.config import Settings, load_settings
from tasks.errors import IntegrityError, RunbookError
from tasks.incident_templates import customer_notice, span
from tasks.journal import Journal
from tasks.notify import Severity
from tasks.postgres import Database
from tasks.recovery import ASIDE, RESTORED, Assessment, RecoveryError
from tasks.report import RunReport, first_line, human_bytes, utc

StopWrites = Literal["at_swap", "before_restore"]
SESSION_GRACE_SECONDS = 5.0  # clients of production get this long to leave before they are ended


class RecoveryResult(BaseModel):
    database: str
    recovered: bool
    outcome: str
    dry_run: bool = False
    backup_id: str | None = None
    backup_taken_at: datetime | None = None
    restored_database: str | None = None
    pre_restore_database: str | None = None
    writes_stopped_at: datetime | None = None
    ready_at: datetime | None = None
    rto_seconds: float | None = None
    outage_seconds: float | None = None
    data_loss_window_seconds: float | None = None
    assessment: list[str] = []
    reconciliation: list[str] = []
    skipped_backups: list[str] = []
    cleaned_up: list[str] = []
    plan: list[str] = []
    approver: str | None = None
    steps: dict[str, float] = {}  # seconds per report step


@flow(name="database-recovery", log_prints=True)
def database_recovery(database: str, restore_point: datetime | None = None, backup_id: str | None = None,
                      stop_writes: StopWrites = "at_swap", auto_approve: bool = False, dry_run: bool = False,
                      incident: str | None = None, approval_timeout_minutes: float = WAIT_SECONDS / 60,
                      ) -> RecoveryResult:
    """Recover a database from its newest verified backup (runbook 2).

    Use: data is lost or corrupted, or the database is unusable. Steps:
      1. assess: exact row counts now against the backup's manifest (an unreachable
         database is assessed as such);
      2. choose the newest verified backup taken at or before `restore_point`, fetch it
         and check its integrity (a corrupt one is skipped for the next older one);
      3. restore it into a new database `<db>_restore_<UTC time>` while the service
         still runs, and verify counts, sequences and the checksums of sampled rows;
      4. wait for approval (unless `auto_approve`) with the evidence;
      5. stop writes: scale the database's services to 0, end the remaining sessions;
      6. promote: production becomes `<db>_pre_restore_<UTC time>` and the restored
         copy takes its name, in one transaction; nothing is dropped;
      7. check the counts of the promoted database, start the services, wait for /ready;
      8. report the RTO, the outage, the data-loss window and what the pre-restore copy
         holds that the restored one lacks; write the customer notice.
    If a step from 5 on fails, everything is undone (production renamed back, services
    started) and a CRITICAL notice goes out. A crashed run is settled by the next one.

    Args:
        database: The database target to recover (a name from runbooks.toml).
        restore_point: Use the newest verified backup taken at or before this time (with
            its time zone); empty: now.
        backup_id: Restore exactly this backup instead, e.g. orders-20260101T000000Z-ab12
            (also one that has not passed a restore test).
        stop_writes: at_swap: the service keeps serving until the swap (shortest
            outage); before_restore: stop it first, so corruption cannot spread.
        auto_approve: Swap without asking (drills, automation); otherwise the run
            pauses for a person's approval.
        dry_run: Assess, choose the backup and print the plan; change nothing.
        incident: An incident reference carried into every notice and the report.
        approval_timeout_minutes: How long the approval request waits; unanswered,
            the run ends with nothing changed.
    """
    return recover("Database recovery", "database-recovery", database, restore_point, backup_id,
                   stop_writes, auto_approve, dry_run, incident, approval_timeout_minutes,
                   why="The database was restored from its backup.")


def recover(title: str, flow_name: str, database: str, restore_point: datetime | None,
            backup_id: str | None, stop_writes: StopWrites, auto_approve: bool, dry_run: bool,
            incident: str | None, approval_timeout_minutes: float, why: str,
            before: Callable[[RunReport, Database], list[str]] | None = None,
            tables: list[str] | None = None) -> RecoveryResult:
    """The recovery every recovery flow runs (`before` adds the flow's own findings to
    the evidence, e.g. what pg_amcheck reported). With `tables`, only those tables are
    restored, into the live database."""
    settings = load_settings()
    db = settings.database(database)
    if backup_id is not None:
        backups.check_backup_id(backup_id)
    if stop_writes not in ("at_swap", "before_restore"):
        raise RecoveryError(f"stop_writes must be at_swap or before_restore, not {stop_writes!r}")
    point = recovery.check_restore_point(restore_point, datetime.now(timezone.utc))
    store = settings.open_store(db.config.store)
    services = recovery.services_of(settings, database)
    with RunReport(title, database) as run:
        run.figure("Incident", incident or "none given")
        run.figure("Restore point", f"{point:%Y-%m-%d %H:%M:%S} UTC")
        with run.step("find backups") as step:
            try:
                tried = recovery.candidates(store, database, point, backup_id)
            except RunbookError as exc:  # no logical backup (verified) for the point
                if not pitr_possible(db, backup_id, tables):
                    raise
                tried, step.detail = [], f"no logical backup to use: {first_line(exc)}"
            else:
                step.detail = f"{tried[0].manifest.id}" + (f" (and {len(tried) - 1} older verified)"
                                                           if len(tried) > 1 else "")
        if tables:
            recovery.resolve_tables(tables, tried[0].manifest)
            recovery.check_row_replacement(db)
        findings = before(run, db) if before else []
        if why_pitr := pitr_reason(db, point, tried, backup_id, tables):
            run.figure("Recovery path", f"point-in-time (pgBackRest): {why_pitr}")
            try:
                return recover_pitr(settings, run, db, restore_point, auto_approve, dry_run, incident,
                                    approval_timeout_minutes, findings, _refuse_second_recovery(database))
            except Exception as exc:
                announce(settings, run, Severity.CRITICAL if "switch production" in _failed_steps(run) else
                         Severity.HIGH, f"Recovery of {db.describe()} (point-in-time) failed; "
                         "production is unchanged unless the report says the switch was undone."
                         + (f" Incident: {incident}." if incident else ""), failed=exc)
                raise
        if db.config.pitr:
            run.figure("Recovery path", logical_reason(db, point, tried[0].manifest, backup_id, tables))
        if dry_run:
            with run.step("assess the damage") as step:
                assessment = recovery.assess(db, tried[0].manifest)
                step.detail = "; ".join(assessment.lines()[:5])
            return _plan(run, db, tried[0].manifest, assessment, services, stop_writes, findings, tables)
        lock_refusal = _refuse_second_recovery(database)
        # The slot first: a slot requested while a submitted task runs waited ~2 s in Prefect.
        with exclusive("database", database, refuse=lock_refusal):
            future = recovery.assess.submit(db, tried[0].manifest)  # runs while the backup is fetched
            try:
                recovery_run = _Recovery(settings, db, store, run, flow_name, services, incident, why)
                if tables:
                    return recovery_run.execute_tables(tried, _joined(run, future), tables, auto_approve,
                                                       approval_timeout_minutes, backup_id is not None)
                return recovery_run.execute(tried, _joined(run, future), findings, stop_writes, auto_approve,
                                            approval_timeout_minutes, backup_id is not None)
            finally:
                future.wait()  # a run that failed early still lets its assessment finish


def logical_reason(db: Database, point: datetime, manifest: Manifest, backup_id: str | None,
                   tables: list[str] | None) -> str:
    """Why a database with a [pitr] section is recovered from a logical backup."""
    why = ("its backup_id was given" if backup_id else "only some tables are restored" if tables else
           f"taken {_duration((point - manifest.started_at).total_seconds())} before the restore point, "
           "within prefer_logical_within_seconds")
    return f"logical backup {manifest.id}: {why}"


def pitr_possible(db: Database, backup_id: str | None, tables: list[str] | None) -> bool:
    """PITR recovers a whole cluster: not for a named backup or a table restore."""
    return db.config.pitr is not None and backup_id is None and not tables


def pitr_reason(db: Database, point: datetime, tried: list[backups.Backup], backup_id: str | None,
                tables: list[str] | None) -> str | None:
    """Why this recovery takes the point-in-time path, or None for the logical one: the
    database has a [pitr] section and no logical backup lies close enough before the point."""
    if not pitr_possible(db, backup_id, tables):
        return None
    assert db.config.pitr is not None
    if not tried:
        return "no verified logical backup before the restore point"
    gap = (point - tried[0].manifest.started_at).total_seconds()
    if gap <= db.config.pitr.prefer_logical_within_seconds:
        return None
    return (f"the newest verified logical backup, {tried[0].manifest.id}, was taken {_duration(gap)} before the "
            f"restore point (more than {db.config.pitr.prefer_logical_within_seconds} s): replaying WAL loses less")


def recover_pitr(settings: Settings, run: RunReport, db: Database, restore_point: datetime | None,
                 auto_approve: bool, dry_run: bool, incident: str | None, timeout_minutes: float,
                 findings: list[str], lock_refusal: Callable[[dict[str, Any], str], str | None]) -> RecoveryResult:
    """The point-in-time path: restore the cluster beside production to the restore point
    (or the latest archived WAL when none is given), verify it, and after approval switch
    production to it; production's data directory is kept under a new name."""
    from flows.pitr_restore import evidence, restore_and_check, stop_quietly, switch_production
    from tasks import pitr

    stanza = settings.stanza(db.name)
    target = pitr.Target(kind="latest") if restore_point is None else pitr.Target(kind="time", time=restore_point)
    result = RecoveryResult(database=db.name, recovered=False, outcome="running")
    if dry_run:
        with run.step("plan: backup set and WAL") as step:
            plan = pitr.plan_restore(stanza, target)
            step.detail = f"{plan.backup.label}; WAL to {plan.newest_wal}"
        result.outcome, result.dry_run = "planned (dry run)", True
        result.plan = [f"restore pgBackRest set {plan.backup.label} beside production and recover to "
                       f"{target.describe()}", "verify it (row counts, pg_amcheck, the verify query)",
                       f"after approval, switch production ({stanza.cfg.data_dir}) to it, keeping the old "
                       "data directory"]
        run.outcome = "planned (dry run)"
        for line in result.plan:
            print(f"Plan: {line}")
        return result
    ref = f" Incident: {incident}." if incident else ""
    announce(settings, run, Severity.HIGH, f"Recovery of {db.describe()} to {target.describe()} started "
                                           f"(point-in-time).{ref}")
    with exclusive("database", db.name, refuse=lock_refusal), pitr_switch.holding(run, db, stanza.cfg):
        done = restore_and_check(run, db, stanza, target, promote=True)
        action = f"switch the cluster of {db.name} to the one recovered to {utc(done.check.recovered_to)}"
        try:
            decision = approve(run, action, findings + evidence(run), auto_approve,
                               wait_seconds=max(1, int(timeout_minutes * 60)),
                               before_wait=lambda: announce(settings, run, Severity.HIGH,
                                                            f"Recovery of {db.name} waits for approval.{ref}"))
        except BaseException:
            stop_quietly(stanza.cfg, pitr.find_pg_bin(stanza.cfg, db.config.bin_dir), done.restored.data_dir)
            run.figure("Restored data directory", f"{done.restored.data_dir} (stopped, kept; production unchanged)")
            raise
        switched_at = datetime.now(timezone.utc)
        kept = switch_production(run, db, stanza, done.restored)
    result.ready_at = datetime.now(timezone.utc)
    result.writes_stopped_at = switched_at
    result.approver = decision.approver
    result.rto_seconds = run.elapsed
    result.outage_seconds = (result.ready_at - switched_at).total_seconds()
    recovered = done.check.recovered_to
    result.data_loss_window_seconds = ((target.time or switched_at) - recovered).total_seconds() if recovered else None
    result.restored_database, result.pre_restore_database = str(stanza.cfg.data_dir), str(kept) if kept else None
    result.recovered, result.outcome = True, "recovered (point-in-time)"
    result.steps = {s.name: round(s.seconds, 3) for s in run.steps}
    run.outcome = result.outcome
    run.figure("RTO", f"{result.rto_seconds:.1f} s")
    run.figure("Outage (switch)", f"{result.outage_seconds:.1f} s")
    announce(settings, run, Severity.INFO, f"{db.name} recovered to {target.describe()} (point-in-time): RTO "
                                           f"{result.rto_seconds:.1f} s; "
                                           + (f"old data kept in {kept}." if kept else "there was no old data directory.")
                                           + ref)
    return result


def _failed_steps(run: RunReport) -> list[str]:
    return [s.name for s in run.steps if s.outcome == "failed"]


def _joined(run: RunReport, future: Any) -> Callable[[], Assessment]:
    """The assessment running in a thread of the flow's task runner; the callable waits
    for it (once) as the "assess the damage" step."""
    done: list[Assessment] = []

    def assessed() -> Assessment:
        if not done:
            with run.step("assess the damage") as step:
                done.append(future.result())
                step.detail = "; ".join(done[0].lines()[:5])
        return done[0]
    return assessed


def _refuse_second_recovery(database: str) -> Callable[[dict[str, Any], str], str | None]:
    def refuse(holder: dict[str, Any], state: str) -> str | None:
        if holder.get("flow") in recovery.RECOVERY_FLOWS:
            return (f"a recovery of {database!r} is already running: {holder.get('flow')} run "
                    f"'{holder.get('flow_run_name')}' ({holder.get('flow_run_id')}, state {state}); "
                    "this one was not started")
        return None
    return refuse


class _Recovery:
    """One recovery under the database's slot: the steps, their durable record and the
    undo of everything from "stop writes" on."""

    def __init__(self, settings: Settings, db: Database, store: Any, run: RunReport, flow_name: str,
                 services: list[str], incident: str | None, why: str) -> None:
        self.settings, self.db, self.store, self.run = settings, db, store, run
        self.services, self.incident, self.why = services, incident, why
        self.production = db.dbname
        self.journal = Journal.begin(store, db.name, flow_name)
        self.result = RecoveryResult(database=db.name, recovered=False, outcome="running")
        self.stopped: list[str] = []
        self.restored: str | None = None
        self.swapped = False
        self.counts_at_swap: dict[str, int] | None = None

    def notify(self, severity: Severity, text: str, failed: BaseException | None = None) -> None:
        ref = f" Incident: {self.incident}." if self.incident else ""
        announce(self.settings, self.run, severity, text + ref, failed=failed)

    def execute(self, tried: list[backups.Backup], assessed: Callable[[], Assessment], findings: list[str],
                stop_writes: StopWrites, auto_approve: bool, timeout_minutes: float,
                explicit: bool) -> RecoveryResult:
        run = self.run
        with run.step("settle earlier runs") as step:
            self.result.cleaned_up = recovery.settle_abandoned(self.settings, self.db, self.store, print,
                                                                   own=self.journal.record.id)
            step.detail = "; ".join(self.result.cleaned_up) or "none left anything behind"
        self.notify(Severity.HIGH, f"Recovery of {self.db.describe()} started: restore, verify, then swap.")
        try:
            if stop_writes == "before_restore":
                assessed()  # before its connection could be one of those ended
                self._stop_writes()
            spool, manifest = self._fetch(tried, explicit)
            assessment = assessed().against(manifest)
            self.result.assessment = assessment.lines()
            run.figure("Backup", f"{manifest.id} (taken {manifest.started_at:%Y-%m-%d %H:%M:%S} UTC, "
                                 f"{human_bytes(manifest.stored_bytes)})")
            self.result.backup_id, self.result.backup_taken_at = manifest.id, manifest.started_at
            maxima = self._restore_and_verify(spool, manifest)
            decision = approve(run, f"swap {self.restored} in as {self.production}",
                               self._evidence(assessment, manifest, findings), auto_approve,
                               wait_seconds=max(1, int(timeout_minutes * 60)),
                               before_wait=lambda: self.notify(
                                   Severity.HIGH, f"Recovery of {self.db.name} waits for approval."))
            self.result.approver = decision.approver
            self.journal.note("approved")
        except BaseException as exc:
            self._abandon_restore(exc)
            raise
        try:
            if stop_writes == "at_swap":
                self._stop_writes()
            self._swap(manifest)
            self._start_services()
        except BaseException as exc:
            self._undo(exc)
            raise
        r = self.result
        r.ready_at = datetime.now(timezone.utc)
        r.rto_seconds = run.elapsed  # from the flow's start
        r.outage_seconds = (r.ready_at - r.writes_stopped_at).total_seconds() if r.writes_stopped_at else None
        r.data_loss_window_seconds = (r.writes_stopped_at - manifest.started_at).total_seconds()
        with run.step("reconcile with the pre-restore copy") as step:
            r.reconciliation = _reconcile(self.db, r.pre_restore_database or "", manifest, maxima)
            step.detail = "; ".join(r.reconciliation[:5])
        r.recovered, r.outcome = True, "recovered"
        r.steps = {s.name: round(s.seconds, 3) for s in run.steps}
        run.outcome = "recovered"
        self.journal.finish("recovered")
        self._figures(manifest)
        _customer_notice(self.db.name, manifest, r, self.why, self.incident)
        self.notify(Severity.INFO, f"{self.db.name} recovered from {manifest.id}: RTO {r.rto_seconds:.1f} s, "
                                   f"outage {r.outage_seconds:.1f} s, data-loss window "
                                   f"{_duration(r.data_loss_window_seconds)}.")
        return r

    def execute_tables(self, tried: list[backups.Backup], assessed: Callable[[], Assessment], names: list[str],
                       auto_approve: bool, timeout_minutes: float, explicit: bool) -> RecoveryResult:
        """Restore only `names`, into the live database: stage them in a side schema,
        verify, and after approval swap their rows in one transaction (the replaced rows
        kept in a schema of their own). Services keep running; writers of those tables
        wait for the swap's lock."""
        run, db, r = self.run, self.db, self.result
        with run.step("settle earlier runs") as step:
            r.cleaned_up = recovery.settle_abandoned(self.settings, db, self.store, print, own=self.journal.record.id)
            step.detail = "; ".join(r.cleaned_up) or "none left anything behind"
        self.notify(Severity.HIGH, f"Restore of tables {', '.join(names)} of {db.describe()} started.")
        now = datetime.now(timezone.utc)
        side, aside = f"runbooks_restore_{now:{recovery.STAMP}}", f"runbooks_pre_restore_{now:{recovery.STAMP}}"
        try:
            spool, manifest = self._fetch(tried, explicit)
            tables = recovery.resolve_tables(names, manifest)
            assessment = assessed().against(manifest)
            r.assessment = [d.line() for d in assessment.differences if d.table in tables] or assessment.lines()[:1]
            r.backup_id, r.backup_taken_at = manifest.id, manifest.started_at
            run.figure("Backup", f"{manifest.id} (taken {manifest.started_at:%Y-%m-%d %H:%M:%S} UTC)")
            run.figure("Tables", ", ".join(tables))
            self._restore_and_verify(spool, manifest)
            with run.step("stage the tables in production") as step:
                self.journal.note("staging tables", side_schema=side, aside_schema=aside)
                recovery.stage_tables(db, self.restored or "", side, tables)
                step.detail = f"schema {side} of {self.production}"
            with run.step("verify the staged tables") as step:
                with postgres.connect(db) as conn:
                    problems = recovery.verify_tables(conn, side, tables, manifest, db)
                if problems:
                    raise fail_verification(manifest, problems)
                step.detail = f"{sum(manifest.tables[t] for t in tables)} rows, as in the manifest"
            with run.step("drop the restored copy"):
                drop_scratch(db, self.restored or "")
                self.restored = None
            decision = approve(run, f"replace the rows of {', '.join(tables)} in {self.production}",
                               [f"**Now vs the backup:** {'; '.join(r.assessment)}",
                                f"**Backup:** {manifest.id}, taken {manifest.started_at:%Y-%m-%d %H:%M:%S} UTC",
                                f"**What happens:** in one transaction, the current rows of {', '.join(tables)} "
                                f"are kept in schema {aside} and replaced by the backup's; other tables are not "
                                "touched, the services keep running"],
                               auto_approve, wait_seconds=max(1, int(timeout_minutes * 60)),
                               before_wait=lambda: self.notify(Severity.HIGH, f"Table restore of {db.name} waits for approval."))
            r.approver = decision.approver
            with run.step("swap the tables in (one transaction)") as step:
                self.journal.note("swapping tables")
                r.writes_stopped_at = datetime.now(timezone.utc)
                locked, dangling = recovery.swap_tables(db, tables, side, aside, manifest)
                step.detail = f"tables locked {locked:.2f} s; counts and content as in the manifest"
        except BaseException as exc:
            self._abandon_tables(exc, side)
            raise
        r.ready_at = datetime.now(timezone.utc)
        r.outage_seconds, r.rto_seconds = locked, run.elapsed
        r.data_loss_window_seconds = (r.writes_stopped_at - manifest.started_at).total_seconds()
        r.pre_restore_database = f"{self.production} (schema {aside})"
        r.reconciliation = recovery.table_reconciliation(db, aside, tables, manifest) + dangling
        r.recovered, r.outcome = True, "recovered"
        run.outcome = "recovered"
        r.steps = {s.name: round(s.seconds, 3) for s in run.steps}
        self.journal.finish("tables restored")
        self._figures(manifest)
        run.figure("Outage (writes stopped to ready)", f"{locked:.2f} s (the tables were locked for the swap)")
        self.notify(Severity.INFO, f"Tables {', '.join(tables)} of {db.name} restored from {manifest.id}; "
                                   f"replaced rows kept in schema {aside}.")
        return r

    def _abandon_tables(self, exc: BaseException, side: str) -> None:
        """Nothing was swapped (the swap is one transaction): drop the staging schema and
        the restored copy."""
        left = []
        try:
            with postgres.connect(self.db, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(side)))
        except Exception as err:  # noqa: BLE001 - the record stays open for the next run
            left.append(f"schema {side} ({first_line(err)})")
        if self.restored:
            try:
                drop_scratch(self.db, self.restored)
            except Exception as err:  # noqa: BLE001
                left.append(f"{self.restored} ({first_line(err)})")
        declined = type(exc).__name__ == "NotApproved"
        self.run.outcome = "not approved" if declined else "failed"
        if not left:
            self.journal.finish("declined: nothing changed" if declined else f"failed, nothing changed: {first_line(exc)}")
        if isinstance(exc, Exception):
            self.notify(Severity.HIGH, f"Table restore of {self.db.name} {'was not approved' if declined else 'failed'}; "
                        "production's tables are unchanged." + (f" Left for the next run: {'; '.join(left)}" if left else ""),
                        failed=None if declined else exc)

    # -- steps -------------------------------------------------------------------------

    def _fetch(self, tried: list[backups.Backup], explicit: bool) -> tuple[SpooledDump, Manifest]:
        """The newest backup that passes integrity; a corrupt one is skipped (and said)."""
        work = self.settings.spool_dir
        for backup in tried:
            m = backup.manifest
            with self.run.step(f"fetch and check {m.id}") as step:
                try:
                    spool = fetch_and_check(self.db, self.store, m, self.settings.encryption(self.db.config.store), work)
                except IntegrityError as exc:
                    if explicit:
                        raise
                    note = f"skipped {m.id}: {first_line(exc)}"
                    self.result.skipped_backups.append(note)
                    get_run_logger().warning("%s; trying the next older verified backup", note)
                    step.outcome, step.detail = "skipped", note
                    continue
                step.detail = f"{spool.entries} archive entries, sha256 ok"
                return spool, m
        raise RecoveryError(f"every verified backup of {self.db.name!r} before the restore point failed its "
                            f"integrity check ({'; '.join(self.result.skipped_backups)}); nothing was changed")

    def _restore_and_verify(self, spool: SpooledDump, manifest: Manifest) -> dict[str, int]:
        run, db = self.run, self.db
        try:
            name = recovery.derived_name(self.production, RESTORED, datetime.now(timezone.utc))
            if postgres.database_exists(db, name):
                raise RecoveryError(f"a database named {name} already exists on {db.describe()}; it is not "
                                    "ours, so it is left alone: rename it or retry in a second")
            with run.step("restore into a new database") as step:
                step.detail = f"{name}: pg_restore --jobs={db.config.jobs} --exit-on-error"
                self.journal.creating(name)
                self.restored = self.result.restored_database = name
                create_scratch(db, name)
                self.journal.note("restoring")
                seconds = restore_into_scratch(db, spool, name)
            run.figure("Restore (pg_restore)", f"{seconds:.1f} s")
        finally:
            spool.close()
        with run.step("verify against the manifest") as step:
            problems = verify_restored(db, name, manifest)
            content = (f"checksums of {sum(c.rows for c in manifest.content.values())} sampled rows "
                       f"({manifest.sample_percent:g} %)" if manifest.content else "no content sample in this backup")
            step.detail = (f"{len(manifest.tables)} tables, {manifest.total_rows} rows, "
                           f"{len(manifest.sequences)} sequences, {content}: "
                           + ("all match" if not problems else f"{len(problems)} differ"))
            if problems:
                raise fail_verification(manifest, problems)
            run.figure("Verified", step.detail)
            self.journal.note("verified")
        return _key_maxima(db, name)

    def _stop_writes(self) -> None:
        with self.run.step("stop writes") as step:
            for name in self.services:
                self.journal.note(f"stopping {name}", services_stopped=self.services)
                self.stopped.append(name)
                recovery.stop_service(self.settings.controller(name), self.settings.service(name).ready_deadline_seconds)
            ended = recovery.end_sessions(self.db, self.production, SESSION_GRACE_SECONDS) \
                if postgres.database_exists(self.db, self.production) else 0
            self.result.writes_stopped_at = datetime.now(timezone.utc)
            step.detail = (f"stopped {', '.join(self.services)}" if self.services else
                           "no service is configured with this database") + f"; {ended} sessions ended"

    def _swap(self, manifest: Manifest) -> None:
        run, db = self.run, self.db
        assert self.restored is not None
        aside = recovery.derived_name(self.production, ASIDE, datetime.now(timezone.utc))
        if postgres.database_exists(db, aside):
            raise RecoveryError(f"a database named {aside} already exists; production was not renamed")
        self.counts_at_swap = _counts_or_none(db, self.production)  # after the last write
        with run.step("promote the restored database") as step:
            step.detail = f"{self.production} -> {aside}, {self.restored} -> {self.production} (one transaction)"
            self.journal.note("promoting", production=self.production, aside=aside, restored=self.restored)
            if postgres.database_exists(db, self.production):
                recovery.swap(db, self.production, aside, self.restored, self.production, pause=_test_pause)
                self.result.pre_restore_database = aside
            else:  # production is gone (dropped): the restored copy takes its name alone
                _rename(db, self.restored, self.production)
            self.swapped = True
            self.journal.note("promoted")
        with run.step("check the promoted database") as step:
            with postgres.connect(db) as conn:
                got = postgres.read_state(conn, db.config.schemas).tables
            if got != manifest.tables:
                raise RecoveryError(f"the promoted database's counts differ from {manifest.id}'s manifest: "
                                    f"{sum(got.values())} rows, expected {manifest.total_rows}")
            step.detail = f"{sum(got.values())} rows in {len(got)} tables, as in the manifest"

    def _start_services(self) -> None:
        with self.run.step("start the services and wait for /ready") as step:
            self.journal.note("starting services")
            for name in self.stopped:
                recovery.start_service(self.settings.controller(name))
            recovery.wait_ready(self.settings, self.stopped)
            step.detail = ", ".join(f"{n} ready" for n in self.stopped) or "no services to start"
            self.journal.note("services ready", services_stopped=[])

    # -- failure paths ----------------------------------------------------------------------

    def _abandon_restore(self, exc: BaseException) -> None:
        """Before promotion: production was never touched. Drop the restored copy, start
        what was stopped, close the record."""
        leftovers = []
        if self.restored:
            try:
                with self.run.step("drop the restored copy"):
                    drop_scratch(self.db, self.restored)
            except Exception as err:  # noqa: BLE001 - the record stays open for the next run
                leftovers.append(f"{self.restored} ({first_line(err)})")
        for failure in self._start_stopped():
            leftovers.append(failure)
        declined = type(exc).__name__ == "NotApproved"
        self.run.outcome = "not approved" if declined else "failed"
        if not leftovers:
            self.journal.finish("declined: nothing changed" if declined else f"failed before promotion: {first_line(exc)}")
        text = (f"Recovery of {self.db.name} was not approved; production is unchanged." if declined else
                f"Recovery of {self.db.name} failed before the swap; production was never touched.")
        if leftovers:
            text += " Left for the next run: " + "; ".join(leftovers)
        if isinstance(exc, Exception):
            self.notify(Severity.HIGH, text, failed=None if declined else exc)

    def _start_stopped(self) -> list[str]:
        failures = []
        for name in reversed(self.stopped):
            try:
                with self.run.step(f"start {name} again"):
                    recovery.start_service(self.settings.controller(name))
                    recovery.wait_ready(self.settings, [name])
            except Exception as err:  # noqa: BLE001 - the next undo steps still run
                failures.append(f"service {name} not started: {first_line(err)}")
        if not failures:
            self.stopped.clear()
        return failures

    def _undo(self, exc: BaseException) -> None:
        """From "stop writes" on: swap back, start the services, prove production is the
        original database again, and say so CRITICAL."""
        run, db = self.run, self.db
        problems = []
        if self.swapped and self.restored and self.result.pre_restore_database:
            try:
                with run.step("undo: rename production back") as step:
                    self.journal.note("undoing the swap")
                    recovery.swap(db, self.production, self.restored, self.result.pre_restore_database,
                                  self.production)
                    step.detail = f"{self.production} -> {self.restored}, {self.result.pre_restore_database} -> {self.production}"
                    self.swapped = False
                    self.result.pre_restore_database = None
            except Exception as err:  # noqa: BLE001
                problems.append(f"production not renamed back: {first_line(err)}")
        if not self.swapped and self.counts_at_swap is not None:
            with run.step("undo: check production is the original") as step:
                now = _counts_or_none(db, self.production)
                if now != self.counts_at_swap:
                    problems.append("production's counts differ from before the swap")
                    step.outcome = "failed"
                step.detail = f"{sum((now or {}).values())} rows, " + (
                    "as before the swap" if now == self.counts_at_swap else "NOT as before the swap")
        if not self.swapped and self.restored:
            try:
                with run.step("undo: drop the restored copy"):
                    drop_scratch(db, self.restored)
            except Exception as err:  # noqa: BLE001
                problems.append(f"{self.restored} not dropped: {first_line(err)}")
        problems += self._start_stopped()
        run.outcome = "failed, undone" if not problems else "failed, undo incomplete"
        if not problems:
            self.journal.finish(f"failed and undone: {first_line(exc)}")
        text = (f"Recovery of {db.name} failed after writes were stopped; " +
                ("it was undone: production is the original database, its services run again."
                 if not problems else "UNDO INCOMPLETE: " + "; ".join(problems)))
        if isinstance(exc, Exception):
            self.notify(Severity.CRITICAL, text, failed=exc)

    # -- report ----------------------------------------------------------------------------

    def _evidence(self, assessment: Assessment, manifest: Manifest, findings: list[str]) -> list[str]:
        lost_from = f"{manifest.started_at:%Y-%m-%d %H:%M:%S} UTC"
        return [*findings,
                "**Now vs the backup:** " + "; ".join(assessment.lines()[:20]),
                f"**Backup:** {manifest.id}, taken {lost_from}" + (
                    f" (skipped: {'; '.join(self.result.skipped_backups)})" if self.result.skipped_backups else ""),
                f"**Verified:** {self.run.figures.get('Verified', '')}",
                f"**Data-loss window:** everything written after {lost_from} until writes stop",
                "**What happens:** " + (f"stop {', '.join(self.services)}; " if self.services else
                                        "no service is configured with this database, none is stopped; ")
                + f"rename {self.production} to {self.production[:recovery.NAME_ROOM]}{ASIDE}YYYYMMDDTHHMMSSZ "
                f"(kept) and {self.restored} to {self.production}"
                + ("; start the services again" if self.services else "")]

    def _figures(self, manifest: Manifest) -> None:
        r, run = self.result, self.run
        run.figure("RTO (start to services ready)", f"{r.rto_seconds:.1f} s")
        run.figure("Outage (writes stopped to ready)", f"{r.outage_seconds:.1f} s" if r.outage_seconds is not None else "none")
        run.figure("Data-loss window", f"{_duration(r.data_loss_window_seconds)} (backup snapshot "
                                       f"{manifest.started_at:%H:%M:%S} to writes stopped "
                                       f"{r.writes_stopped_at:%H:%M:%S} UTC)")
        run.figure("Pre-restore copy", r.pre_restore_database or "none (production was missing)")
        run.figure("Assessment", "; ".join(r.assessment[:10]))
        run.figure("Pre-restore holds", "; ".join(r.reconciliation[:10]))
        run.figure("Approver", r.approver or "")


def _rename(db: Database, old: str, new: str) -> None:
    with postgres.connect(db, dbname="postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new)))


def _counts_or_none(db: Database, dbname: str) -> dict[str, int] | None:
    try:
        with postgres.connect(db, dbname=dbname) as conn:
            return postgres.read_state(conn, db.config.schemas).tables
    except RunbookError:
        return None


def _key_maxima(db: Database, dbname: str) -> dict[str, int]:
    """The highest integer primary key of each table of the restored copy (before anyone
    writes to it): rows above it in the pre-restore copy are the ones it lacks."""
    out = {}
    with postgres.connect(db, dbname=dbname) as conn:
        for table, key in postgres.primary_keys(conn, db.config.schemas).items():
            if len(key) != 1:
                continue
            schema, name = table.split(".", 1)
            top = conn.execute(sql.SQL("SELECT max({}) FROM {}").format(
                sql.Identifier(key[0]), sql.Identifier(schema, name))).fetchone()[0]
            if isinstance(top, int) or top is None:
                out[table] = top or 0
    return out


def _reconcile(db: Database, aside: str, manifest: Manifest, maxima: dict[str, int]) -> list[str]:
    """Per table: the pre-restore copy's count against the restored one (the manifest's,
    verified), and its rows above the restored copy's highest key."""
    if not aside:
        return ["no pre-restore copy (production was missing)"]
    lines = []
    try:
        with postgres.connect(db, dbname=aside) as conn:
            old = postgres.read_state(conn, db.config.schemas).tables
            keys = postgres.primary_keys(conn, db.config.schemas)
            for table in sorted(set(old) | set(manifest.tables)):
                before, after = old.get(table), manifest.tables.get(table)
                if before is None or after is None:
                    lines.append(f"{table}: only in the {'restored' if before is None else 'pre-restore'} database")
                    continue
                above = ""
                if table in maxima and len(keys.get(table, [])) == 1:
                    schema, name = table.split(".", 1)
                    col = sql.Identifier(keys[table][0])
                    n, lo, hi = conn.execute(sql.SQL("SELECT count(*), min({c}), max({c}) FROM {t} WHERE {c} > %s")
                                             .format(c=col, t=sql.Identifier(schema, name)),
                                             (maxima[table],)).fetchone()
                    if n:
                        above = f", {n} rows with {keys[table][0]} above the restored maximum {maxima[table]} ({lo}..{hi})"
                if before != after or above:
                    lines.append(f"{table}: pre-restore {before} rows, restored {after} ({after - before:+d}){above}")
    except RunbookError as exc:
        return [f"the pre-restore copy could not be read: {first_line(exc)}"]
    return lines or ["the pre-restore copy holds nothing the restored database lacks"]


def _duration(seconds: float | None) -> str:
    return "unknown" if seconds is None else span(seconds)


def _customer_notice(database: str, manifest: Manifest, r: RecoveryResult, why: str, incident: str | None) -> str:
    """The customer notice (the reference's template 4) with the real times, as an
    artifact for a person to complete and send; it is never sent automatically."""
    stopped, ready, taken = r.writes_stopped_at, r.ready_at, manifest.started_at
    assert stopped and ready
    text = customer_notice(
        date=stopped, start=stopped, end=ready,
        what_happened=f"{why} The {database} database was restored from its backup taken at "
                      f"{taken:%Y-%m-%d %H:%M:%S} UTC.",
        root_cause="[to be completed]",
        impact=f"The service was unavailable for {r.outage_seconds:.0f} seconds. Changes made between "
               f"{taken:%H:%M:%S} and {stopped:%H:%M:%S} UTC on {stopped:%Y-%m-%d} "
               f"({_duration(r.data_loss_window_seconds)}) may be missing; we are reconciling them from the copy "
               "we kept.",
        resolution=f"We restored the database from a verified backup, checked every table's row count and a sample "
                   f"of records against the backup's manifest, and brought the service back at {ready:%H:%M:%S} UTC.",
        reference=incident)
    from prefect.artifacts import create_markdown_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is not None:
        create_markdown_artifact(markdown=f"# Customer notice (draft, not sent)\n\n```\n{text}\n```\n",
                                 key=f"customer-notice-{database}"[:100],
                                 description=f"Customer notice for the recovery of {database} (draft, not sent)")
    return text


def _plan(run: RunReport, db: Database, manifest: Manifest, assessment: Assessment, services: list[str],
          stop_writes: StopWrites, findings: list[str], tables: list[str] | None = None) -> RecoveryResult:
    with run.step("check server"):
        can_create = postgres.can_create_database(db)
    plan = [*findings,
            f"assessment: {'; '.join(assessment.lines()[:10])}",
            f"restore {manifest.id} (taken {manifest.started_at:%Y-%m-%d %H:%M:%S} UTC) into "
            f"{db.dbname[:recovery.NAME_ROOM]}{RESTORED}<time>" + ("" if can_create else
                                                                 " (WARNING: this role cannot CREATE DATABASE)"),
            f"verify {len(manifest.tables)} tables / {manifest.total_rows} rows"
            + (f" and {len(manifest.content)} content checksums" if manifest.content else ""),
            *((f"stage {', '.join(recovery.resolve_tables(tables, manifest))} in a side schema of {db.dbname}, "
               "verify them, then replace their rows in one transaction (the current rows kept in a schema); "
               "the services keep running",) if tables else
              (("stop " + ", ".join(services) if services else "no services to stop")
               + (" before the restore" if stop_writes == "before_restore" else " at the swap"),
               f"rename {db.dbname} aside (kept), the restored copy to {db.dbname}; start the services"))]
    run.outcome = "planned (dry run)"
    for line in plan:
        print(f"Plan: {line}")
    return RecoveryResult(database=db.name, recovered=False, outcome="planned (dry run)", dry_run=True,
                          backup_id=manifest.id, backup_taken_at=manifest.started_at,
                          assessment=assessment.lines(), plan=plan)


def _test_pause() -> None:
    """Between the two renames, for the crash tests only (RUNBOOKS_TEST_SWAP_PAUSE seconds)."""
    seconds = float(os.environ.get("RUNBOOKS_TEST_SWAP_PAUSE", "0") or 0)
    if seconds > 0:
        print("swap in progress (test pause)")
        time.sleep(seconds)
