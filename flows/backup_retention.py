"""Runbook: remove backups past their retention (daily)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from prefect import flow
from pydantic import BaseModel

from flows._common import announce
from tasks import backups
from tasks.approval import approve
from tasks.concurrency import exclusive
from tasks.config import Settings, load_settings
from tasks.notify import Severity
from tasks.report import RunReport, human_bytes
from tasks.storage import Store

ORPHAN_AGE = timedelta(days=1)  # older than any backup still being written


class RetentionResult(BaseModel):
    dry_run: bool
    kept: dict[str, list[str]] = {}
    deleted: dict[str, list[str]] = {}
    orphans: dict[str, list[str]] = {}
    freed_bytes: int = 0
    approved_by: str | None = None
    sizes: dict[str, int] = {}  # stored bytes of each selected backup


@flow(name="backup-retention", log_prints=True)
def backup_retention(database: str | None = None, dry_run: bool = False,
                     auto_approve: bool = False) -> RetentionResult:
    """Delete backups older than each database's `retention_days` (default 30).

    Use: daily (scheduled, auto-approved). Never deletes the newest verified backup of a
    database, nor its newest backup of all. Applies to the primary store and its replica
    (where the primary's restore-test records count: a replica copy of the newest
    verified backup stays too).
    Steps, per database (all configured ones unless `database` is given):
      1. list its backups in each store, newest first;
      2. select those past the retention window, less the ones always kept, and the
         orphans: folders of the database with no manifest, untouched for a day;
      3. wait for approval with that list (unless `auto_approve`);
      4. under the database's lock, list again and delete what was approved and is still
         expired (manifest first, so a half-deleted backup is never listed).
    `dry_run` lists what would go and deletes nothing.

    Args:
        database: Only this database target; empty: every configured database.
        dry_run: List what would be deleted; delete nothing.
        auto_approve: Delete without asking. Leave off when running by hand: the run
            then waits for a person to approve the list in the UI. The schedule turns it on.
    """
    settings = load_settings()
    names = [settings.database(database).name] if database else sorted(settings.databases)
    result = RetentionResult(dry_run=dry_run)
    verb = "would delete" if dry_run else "to delete"
    with RunReport("Backup retention", database or "all databases") as run:
        try:
            plan = _select(settings, names, run, result)
            evidence = []
            for label, ids in plan.items():
                for backup_id in ids:
                    kind = "orphan " if backup_id in result.orphans.get(label, []) else ""
                    evidence.append(f"{label}: {verb} {kind}{backup_id}")
            for line in evidence:
                print(line)
            _figures(run, result, done=False)
            if dry_run or not evidence:
                run.outcome = "planned (dry run)" if dry_run else "nothing to delete"
                return result
            action = f"delete {len(evidence)} backups past retention"
            if not auto_approve:
                announce(settings, run, Severity.MEDIUM, f"Waiting for approval to {action}.")
            decision = approve(run, action, evidence, auto=auto_approve)
            result.approved_by = decision.approver
            gone = _delete(settings, names, plan, run)
            sizes = {i: n for i, n in result.sizes.items() if any(i in ids for ids in gone.values())}
            result.deleted = {k: [i for i in v if i in gone.get(k, [])] for k, v in result.deleted.items()}
            result.orphans = {k: [i for i in v if i in gone.get(k, [])] for k, v in result.orphans.items()}
            result.freed_bytes = sum(sizes.values())
            _figures(run, result, done=True)
            return result
        except Exception as exc:
            run.outcome = "failed"
            announce(settings, run, Severity.MEDIUM, "Backup retention failed.", failed=exc)
            raise


def _stores(settings: Settings, name: str) -> list[str]:
    primary, replica = settings.stores_for(settings.database(name))
    return [primary] + ([replica] if replica else [])


def _expired(settings: Settings, name: str, store: Store,
             verified: dict[str, backups.Verification]) -> tuple[list[backups.Backup], list[backups.Backup], list[str]]:
    """(all backups, the expired ones, orphans) of one database in one store."""
    db = settings.database(name)
    entries = backups.list_backups(store, name)
    for b in entries:  # the primary's test records also hold for its copies
        if b.verification is None and b.manifest.id in verified:
            b.verification = verified[b.manifest.id]
    verified.update({b.manifest.id: b.verification for b in entries if b.verification})
    now = datetime.now(timezone.utc)
    return (entries, backups.expired(entries, now, db.config.retention_days),
            backups.orphans(store, name, now - ORPHAN_AGE))


def _select(settings: Settings, names: list[str], run: RunReport,
            result: RetentionResult) -> dict[str, list[str]]:
    """What would go, per `<database>@<store>`; fills `result`."""
    plan: dict[str, list[str]] = {}
    for name in names:
        verified: dict[str, backups.Verification] = {}
        for store_name in _stores(settings, name):
            label = f"{name}@{store_name}"
            with run.step(f"select {label}") as step:
                entries, gone, stray = _expired(settings, name, settings.open_store(store_name), verified)
                step.detail = (f"{len(entries)} backups, {len(gone)} past "
                               f"{settings.database(name).config.retention_days} days, {len(stray)} orphans")
            result.deleted[label] = [b.manifest.id for b in gone]
            result.kept[label] = [b.manifest.id for b in entries if b not in gone]
            result.orphans[label] = stray
            result.sizes.update({b.manifest.id: b.manifest.stored_bytes for b in gone})
            result.freed_bytes += sum(b.manifest.stored_bytes for b in gone)
            plan[label] = result.deleted[label] + stray
    return plan


def _figures(run: RunReport, result: RetentionResult, done: bool) -> None:
    """Planned figures first; after deletion, what actually went."""
    deleted, orphans = sum(map(len, result.deleted.values())), sum(map(len, result.orphans.values()))
    for old, new in (("Backups to delete", "Backups deleted"), ("Orphans to remove", "Orphans removed"),
                     ("Space to free", "Space freed")):
        run.figures.pop(old if done else new, None)
    run.figure("Backups deleted" if done else "Backups to delete", deleted)
    run.figure("Orphans removed" if done else "Orphans to remove", orphans)
    run.figure("Space freed" if done else "Space to free", human_bytes(result.freed_bytes))


def _delete(settings: Settings, names: list[str], plan: dict[str, list[str]],
            run: RunReport) -> dict[str, list[str]]:
    """Delete what was approved, re-checked under the database's lock: a backup that
    stopped being expired meanwhile (e.g. it became the newest verified) stays.
    Returns what was deleted, per `<database>@<store>`."""
    deleted: dict[str, list[str]] = {}
    for name in names:
        with exclusive("database", name):
            verified: dict[str, backups.Verification] = {}
            for store_name in _stores(settings, name):
                label = f"{name}@{store_name}"
                store = settings.open_store(store_name)
                _, gone, stray = _expired(settings, name, store, verified)
                still = {b.manifest.id for b in gone} | set(stray)
                doomed = [i for i in plan.get(label, []) if i in still]
                if doomed:
                    with run.step(f"delete {len(doomed)} from {label}"):
                        for backup_id in doomed:
                            backups.delete_backup(store, backup_id)
                            deleted.setdefault(label, []).append(backup_id)
    return deleted
