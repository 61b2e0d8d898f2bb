"""DR scenario: the database is corrupt: confirm it (pg_amcheck, or a query that fails),
then recover from the newest verified backup with writes stopped first."""

from __future__ import annotations

from datetime import datetime

from prefect import flow

from flows.database_recovery import RecoveryResult, StopWrites, recover
from tasks import postgres
from tasks.approval import WAIT_SECONDS
from tasks.errors import DatabaseError, DatabaseUnavailable, RunbookError, VerificationError
from tasks.postgres import Database
from tasks.report import RunReport, first_line


class NoCorruptionFound(RunbookError):
    """The checks found nothing wrong, and `force` was not given."""


@flow(name="database-corruption", log_prints=True)
def database_corruption(database: str, check_query: str | None = None, force: bool = False,
                        restore_point: datetime | None = None, backup_id: str | None = None,
                        stop_writes: StopWrites = "before_restore", auto_approve: bool = False,
                        dry_run: bool = False, incident: str | None = None,
                        approval_timeout_minutes: float = WAIT_SECONDS / 60) -> RecoveryResult:
    """Recover a corrupt database from its newest verified backup (DR scenario 1).

    Use: queries fail with "invalid page", "could not read block", "missing chunk" or
    similar, or a data-quality check found impossible values. Steps:
      1. confirm: pg_amcheck (heap and B-tree indexes) on production where it is
         available, and `check_query` if given (it fails: corruption);
      2. without a finding the run stops (nothing changed) unless `force`;
      3. recover as database-recovery does, with writes stopped *before* the restore
         by default, so the corruption cannot spread into new writes.
    The findings are part of the evidence the approver sees.

    Args:
        database: The database target that is corrupt (a name from runbooks.toml).
        check_query: A read-only query that fails on the corruption, e.g.
            SELECT count(*) FROM orders; empty: pg_amcheck alone.
        force: Recover even when no check finds corruption.
        restore_point: Use the newest verified backup taken at or before this time
            (with its time zone); empty: now.
        backup_id: Restore exactly this backup instead, e.g. orders-20260101T000000Z-ab12.
        stop_writes: before_restore (default): stop the service first; at_swap: keep it
            serving until the swap.
        auto_approve: Swap without asking (drills); otherwise the run pauses for approval.
        dry_run: Check, choose the backup and print the plan; change nothing.
        incident: An incident reference carried into every notice and the report.
        approval_timeout_minutes: How long the approval request waits; unanswered,
            the run ends with nothing changed.
    """

    def confirm(run: RunReport, db: Database) -> list[str]:
        with run.step("confirm the corruption") as step:
            findings = find_corruption(db, check_query)
            step.detail = "; ".join(findings) or "nothing found"
        run.figure("Corruption found", "; ".join(findings) or "none")
        if not findings and not force:
            raise NoCorruptionFound(f"no check found corruption in {db.describe()} (pg_amcheck"
                                    + (" and the check query" if check_query else "")
                                    + "); nothing was changed. Run with force to recover anyway")
        return [f"**Corruption:** {'; '.join(findings) or 'none found (forced)'}"]

    return recover("Database corruption", "database-corruption", database, restore_point, backup_id,
                   stop_writes, auto_approve, dry_run, incident, approval_timeout_minutes,
                   why="The database was corrupt; it was restored from its backup.", before=confirm)


def find_corruption(db: Database, check_query: str | None) -> list[str]:
    """What pg_amcheck and the check query report, one line each (empty: nothing found)."""
    findings = []
    try:
        if postgres.amcheck(db, db.dbname) is None:
            print("pg_amcheck is not available here: only the check query can confirm corruption")
    except VerificationError as exc:
        findings.append(first_line(exc))
    except (DatabaseError, DatabaseUnavailable) as exc:
        findings.append(f"production cannot be checked: {first_line(exc)}")
    if check_query:
        try:
            with postgres.connect(db) as conn:
                conn.execute("SET TRANSACTION READ ONLY")
                conn.execute(check_query)  # type: ignore[arg-type] - the operator's own query, read-only
        except (DatabaseError, DatabaseUnavailable) as exc:
            findings.append(f"production cannot be checked: {first_line(exc)}")
        except Exception as exc:  # noqa: BLE001 - a failing query is the finding
            findings.append(f"the check query fails: {first_line(exc)}")
    return findings

