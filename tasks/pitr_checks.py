"""What proves a restored cluster, and the marker writer that measures the RPO.

A restored cluster counts as verified when it recovered to where it was asked (its last
replayed transaction not after the target), every database answers with its row
counts, pg_amcheck finds nothing (where it can run) and the configured query is true.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from pydantic import SecretStr

from tasks import postgres
from tasks.errors import VerificationError
from tasks.pitr import PitrConfig, Restored, Target

MARKERS = "runbooks_rpo_markers"


@dataclass
class ClusterCheck:
    recovered_to: datetime | None  # the last transaction replayed
    paused: bool
    timeline: int | None
    databases: dict[str, int] = field(default_factory=dict)  # database -> rows in its tables
    tables: int = 0
    query: str | None = None

    @property
    def rows(self) -> int:
        return sum(self.databases.values())


def row_counts(dsn: str) -> tuple[int, int]:
    """(tables, rows) of every ordinary user table of one database, counted exactly."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = conn.execute(
            """SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                 AND n.nspname NOT LIKE 'pg_toast%' AND NOT c.relispartition""").fetchall()
        rows = 0
        for schema, table in tables:
            got = conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(
                sql.Identifier(schema), sql.Identifier(table))).fetchone()
            rows += int(got[0]) if got else 0
    return len(tables), rows


def check_cluster(db: postgres.Database, cfg: PitrConfig, restored: Restored, state: dict[str, Any],
                  target: Target) -> ClusterCheck:
    """Verify a restored cluster's data (see the module's docstring; pg_amcheck is
    `amcheck_cluster`, run after the RTO clock stops). Raises VerificationError with
    every problem found, after looking at everything."""
    check = ClusterCheck(recovered_to=state["last_replayed_xact"], paused=state["paused"],
                         timeline=state["timeline"])
    problems: list[str] = []
    if target.kind == "time" and target.time and check.recovered_to and check.recovered_to > target.time:
        problems.append(f"recovered to {check.recovered_to:%Y-%m-%d %H:%M:%S.%f} UTC, after the target "
                        f"{target.describe()}")
    names = databases(db, restored)
    if db.dbname not in names:
        problems.append(f"database {db.dbname!r} is missing from the restored cluster")
    for name in names:
        try:
            tables, rows = row_counts(restored.dsn(db.dsn, name))
            check.databases[name], check.tables = rows, check.tables + tables
        except psycopg.Error as exc:
            problems.append(f"{name}: cannot count rows: {str(exc).strip().splitlines()[0]}")
    if cfg.verify_query:
        try:
            with psycopg.connect(restored.dsn(db.dsn, db.dbname), autocommit=True) as conn:
                row = conn.execute(cfg.verify_query).fetchone()  # type: ignore[arg-type]
            check.query = "true" if row and row[0] else f"returned {row[0] if row else 'no row'}"
            if check.query != "true":
                problems.append(f"the verify query {check.query}")
        except psycopg.Error as exc:
            check.query = "failed"
            problems.append(f"the verify query failed: {str(exc).strip().splitlines()[0]}")
    if problems:
        raise VerificationError(f"restored cluster on port {restored.port}: " + "; ".join(problems))
    return check


def databases(db: postgres.Database, restored: Restored) -> list[str]:
    with psycopg.connect(restored.dsn(db.dsn, "postgres"), autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1")]


def amcheck_cluster(db: postgres.Database, restored: Restored, in_recovery: bool) -> dict[str, str]:
    """pg_amcheck on every database of the restored cluster: ok, or why it was skipped;
    raises VerificationError with its findings. A cluster paused in recovery is
    read-only: only databases that already have the amcheck extension are checked."""
    side = postgres.Database(db.name, db.config.model_copy(update={"dsn": SecretStr(restored.dsn(db.dsn))}))
    found: dict[str, str] = {}
    for name in databases(db, restored):
        result = postgres.amcheck(side, name, install=not in_recovery)
        found[name] = result or ("skipped: amcheck not installed and the cluster is read-only"
                                 if in_recovery else "skipped: not available here")
    return found


class MarkerWriter:
    """Inserts a marker row every `interval` seconds into the database (the RPO drill's
    measure of what a crash loses). Remembers each marker it saw committed."""

    def __init__(self, dsn: str, interval: float = 1.0) -> None:
        self.dsn, self.interval = dsn, interval
        self.committed: list[tuple[int, datetime]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rpo-markers", daemon=True)

    def __enter__(self) -> "MarkerWriter":
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {MARKERS} "
                         "(id bigserial PRIMARY KEY, written_at timestamptz NOT NULL DEFAULT clock_timestamp())")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        conn: psycopg.Connection | None = None
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
                row = conn.execute(f"INSERT INTO {MARKERS} DEFAULT VALUES RETURNING id, written_at").fetchone()
                if row:
                    self.committed.append((int(row[0]), row[1]))
            except psycopg.Error:
                self.errors += 1  # the primary is gone: the drill killed it
                conn = None
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
        if conn is not None and not conn.closed:
            conn.close()


def count_lost(dsn: str, committed: list[tuple[int, datetime]]) -> tuple[int, float, datetime | None]:
    """(markers lost, seconds of writes lost, the newest marker recovered): the measured RPO."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        present = {r[0] for r in conn.execute(f"SELECT id FROM {MARKERS}")}
    lost = [(i, at) for i, at in committed if i not in present]
    kept = [at for i, at in committed if i in present]
    newest_kept = max(kept, default=None)
    if not lost:
        return 0, 0.0, newest_kept
    last_committed = max(at for _, at in committed)
    since = newest_kept or min(at for _, at in lost)
    return len(lost), (last_committed - since).total_seconds(), newest_kept
