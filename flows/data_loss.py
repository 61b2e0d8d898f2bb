"""DR scenario: data lost (a table dropped or truncated, rows deleted): recover the
database from the newest verified backup taken before the loss."""

from __future__ import annotations

from datetime import datetime

from prefect import flow

from flows.database_recovery import RecoveryResult, StopWrites, recover
from tasks.approval import WAIT_SECONDS


@flow(name="data-loss", log_prints=True)
def data_loss(database: str, tables: list[str] | None = None, restore_point: datetime | None = None,
              backup_id: str | None = None,
              stop_writes: StopWrites = "at_swap", auto_approve: bool = False, dry_run: bool = False,
              incident: str | None = None, approval_timeout_minutes: float = WAIT_SECONDS / 60,
              ) -> RecoveryResult:
    """Recover from lost data: a table dropped or truncated, rows deleted (DR scenario 2).

    Use: rows or tables are missing (a bad migration, a wrong DELETE, a script run
    against production). Set `restore_point` to a time just before the loss: the newest
    verified backup taken at or before it is restored. The steps are those of
    database-recovery: assess (which tables lost how many rows), restore into a new
    database and verify it while the service runs, approval, a swap of a few seconds,
    and a report of the rows written after the backup that the pre-restore copy still
    holds, to carry over by hand.
    With `tables`, only those tables are restored, into the live database: staged in a
    side schema and verified, then (after approval) their rows are replaced in one
    transaction; the replaced rows are kept in a schema of their own, other tables and
    the services are not touched.

    Args:
        database: The database target that lost data (a name from runbooks.toml).
        tables: Restore only these tables (e.g. order_items or public.order_items) into
            the live database; empty: the whole database.
        restore_point: A time just before the loss (with its time zone); the newest
            verified backup taken at or before it is used; empty: now.
        backup_id: Restore exactly this backup instead, e.g. orders-20260101T000000Z-ab12.
        stop_writes: at_swap: the service keeps serving until the swap (shortest
            outage); before_restore: stop it first.
        auto_approve: Swap without asking (drills); otherwise the run pauses for approval.
        dry_run: Assess, choose the backup and print the plan; change nothing.
        incident: An incident reference carried into every notice and the report.
        approval_timeout_minutes: How long the approval request waits; unanswered,
            the run ends with nothing changed.
    """
    return recover("Data loss", "data-loss", database, restore_point, backup_id, stop_writes,
                   auto_approve, dry_run, incident, approval_timeout_minutes,
                   why="Data was lost; the database was restored from its backup.", tables=tables)
