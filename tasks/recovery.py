"""The steps of database recovery (runbook 2) that the recovery flows share: assess the
damage, choose the backup, stop writes, swap the restored database in, undo,
and settle what a dead run left behind.

Production is never dropped: the swap renames it aside to `<db>_pre_restore_<UTC time>`
and the restored copy to the production name, both renames in one transaction, so no
crash can leave the production name missing. Only `runbooks recovery cleanup` drops
the copies, after a person confirms.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql
from pydantic import BaseModel

from tasks import backups, journal, postgres
from tasks.backups import Backup, Manifest
from tasks.config import Settings
from tasks.errors import BackupNotFound, DatabaseError, DatabaseUnavailable, RunbookError
from tasks.journal import RunRecord
from tasks.postgres import Database
from tasks.probes import wait_until_ready
from tasks.report import first_line
from tasks.retries import RETRY_OPTIONS
from tasks.service import Controller
from tasks.storage import Store

RECOVERY_FLOWS = ("database-recovery", "data-loss", "database-corruption")
STAMP = "%Y%m%dT%H%M%SZ"
RESTORED, ASIDE = "_restore_", "_pre_restore_"
NAME_ROOM = 40  # of PostgreSQL's 63 bytes, what a derived name keeps of the production name


class RecoveryError(RunbookError):
    """A recovery cannot go on; the message says why and what to do."""


def derived_name(production: str, kind: str, at: datetime) -> str:
    """`<db>_restore_<UTC time>` or `<db>_pre_restore_<UTC time>` (fits 63 bytes)."""
    return f"{production[:NAME_ROOM]}{kind}{at.astimezone(timezone.utc):{STAMP}}"


# --- 1. assess -------------------------------------------------------------------------

class TableDifference(BaseModel):
    table: str
    now: int | None  # None: the table is missing now
    backup: int | None  # None: the backup does not have it

    def line(self) -> str:
        if self.now is None:
            return f"{self.table}: missing now (the backup has {self.backup} rows)"
        if self.backup is None:
            return f"{self.table}: {self.now} rows now, not in the backup"
        delta = self.now - self.backup
        return f"{self.table}: {self.now} rows now, {self.backup} in the backup ({delta:+d})"


class Assessment(BaseModel):
    """The production database now, against the chosen backup's manifest."""

    reachable: bool
    detail: str = ""
    tables: dict[str, int] = {}
    differences: list[TableDifference] = []

    def against(self, manifest: Manifest) -> "Assessment":
        """The same reading compared with another backup (after a fallback)."""
        diffs = [] if not self.reachable else [
            TableDifference(table=t, now=self.tables.get(t), backup=manifest.tables.get(t))
            for t in sorted(set(self.tables) | set(manifest.tables))
            if self.tables.get(t) != manifest.tables.get(t)]
        return self.model_copy(update={"differences": diffs})

    def lines(self) -> list[str]:
        if not self.reachable:
            return [f"production is unreachable: {self.detail}"]
        if not self.differences:
            return [f"every table has the backup's row count ({sum(self.tables.values())} rows)"]
        return [d.line() for d in self.differences]


@task(name="assess-damage", cache_policy=NO_CACHE)
def assess(db: Database, manifest: Manifest) -> Assessment:
    """Exact row counts of production now against the backup's manifest. A database that
    cannot be reached is assessed as unreachable (that may be why we recover)."""
    try:
        with postgres.connect(db) as conn:
            state = postgres.read_state(conn, db.config.schemas)
    except (DatabaseError, DatabaseUnavailable) as exc:
        return Assessment(reachable=False, detail=first_line(exc))
    return Assessment(reachable=True, tables=state.tables).against(manifest)


# --- 2. choose the backup ----------------------------------------------------------------

def check_restore_point(restore_point: datetime | None, now: datetime) -> datetime:
    """The restore point in UTC; it needs a zone and must not lie in the future."""
    if restore_point is None:
        return now
    if restore_point.tzinfo is None or restore_point.utcoffset() is None:
        raise RecoveryError(f"restore_point {restore_point.isoformat()} has no time zone; give one, "
                            "e.g. 2026-03-07T14:00:00Z or 2026-03-07T15:00:00+01:00")
    point = restore_point.astimezone(timezone.utc)
    if point > now + timedelta(seconds=60):
        raise RecoveryError(f"restore_point {point:%Y-%m-%d %H:%M:%S} UTC is in the future "
                            f"(now: {now:%Y-%m-%d %H:%M:%S} UTC)")
    return point


def candidates(store: Store, database: str, restore_point: datetime, backup_id: str | None) -> list[Backup]:
    """The backups to try, best first: the given one; or the verified backups taken at or
    before the restore point, newest first. Raises before anything is changed when there
    is nothing to restore from."""
    if backup_id:
        return [backups.find_backup(store, database, backups.check_backup_id(backup_id))]
    every = backups.list_backups(store, database)
    if not every:
        raise BackupNotFound(f"no backups of database {database!r} in {store.describe()}: nothing to "
                             "recover from (nothing was stopped or changed)")
    before = [b for b in every if b.manifest.finished_at <= restore_point]
    if not before:
        oldest = min(every, key=lambda b: b.manifest.finished_at).manifest
        raise BackupNotFound(f"no backup of {database!r} was taken at or before "
                             f"{restore_point:%Y-%m-%d %H:%M:%S} UTC (the oldest, {oldest.id}, finished "
                             f"{oldest.finished_at:%Y-%m-%d %H:%M:%S} UTC); nothing was changed")
    verified = [b for b in before if b.verified]
    if not verified:
        shown = ", ".join(b.manifest.id for b in before[:5])
        raise RecoveryError(f"no backup of {database!r} at or before {restore_point:%Y-%m-%d %H:%M:%S} UTC "
                            f"has passed a restore test (unverified: {shown}); run restore-test first, or "
                            "name one with backup_id to use it anyway")
    return verified


# --- 5. stop writes -----------------------------------------------------------------------

def services_of(settings: Settings, database: str) -> list[str]:
    """The services configured with `database = "<database>"`: the ones that write to it."""
    return sorted(name for name, svc in settings.services.items() if svc.database == database)


@task(name="stop-service", cache_policy=NO_CACHE, **RETRY_OPTIONS)
def stop_service(controller: Controller, timeout: float) -> str:
    """Scale to 0 and wait until nothing of it runs (no ready replica, no process or pod)."""
    controller.scale(0)
    return controller.wait_stopped(timeout).detail


@task(name="start-service", cache_policy=NO_CACHE, **RETRY_OPTIONS)
def start_service(controller: Controller) -> str:
    return controller.start().detail


def wait_ready(settings: Settings, names: list[str]) -> None:
    for name in names:
        cfg = settings.service(name)
        wait_until_ready(cfg.base_url, cfg.ready_deadline_seconds, interval=0.05, timeout=cfg.probe_timeout)


def other_sessions(conn, dbname: str) -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    return [(int(pid), str(app or "")) for pid, app in conn.execute(
        "SELECT pid, application_name FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (dbname,)).fetchall()]


@task(name="end-client-sessions", cache_policy=NO_CACHE, **RETRY_OPTIONS)
def end_sessions(db: Database, dbname: str, grace_seconds: float) -> int:
    """Wait up to `grace_seconds` for the clients of `dbname` to leave, then terminate the
    rest. Returns how many were terminated."""
    with postgres.connect(db, dbname="postgres", autocommit=True) as conn:
        deadline = time.monotonic() + grace_seconds
        while other_sessions(conn, dbname) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = other_sessions(conn, dbname)
        for pid, _ in left:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        return len(left)


# --- 6. promote ------------------------------------------------------------------------------

def swap(db: Database, first: str, first_to: str, second: str, second_to: str,
         pause: Callable[[], None] | None = None, attempts: int = 5) -> None:
    """Rename `first` to `first_to` and `second` to `second_to` in one transaction: both
    happen or neither. Sessions still open on either database are terminated first (a
    rename needs none); a client that slips back in between is terminated again."""
    for attempt in range(attempts):
        with postgres.connect(db, dbname="postgres", autocommit=True) as conn:
            for name in (first, second):
                for pid, _ in other_sessions(conn, name):
                    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            try:
                with conn.transaction():
                    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        sql.Identifier(first), sql.Identifier(first_to)))
                    if pause:
                        pause()
                    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        sql.Identifier(second), sql.Identifier(second_to)))
                return
            except Exception as exc:  # noqa: BLE001 - classified below
                busy = "is being accessed by other users" in str(exc)
                if not busy or attempt == attempts - 1:
                    raise DatabaseError(f"{db.describe()}: renaming {first} -> {first_to} and {second} -> "
                                        f"{second_to} failed, nothing was renamed: "
                                        f"{first_line(exc)}") from None
        time.sleep(0.2)


# --- crashed runs --------------------------------------------------------------------------

def settle_abandoned(settings: Settings, db: Database, store: Store,
                     say: Callable[[str], None], own: str | None = None) -> list[str]:
    """Clean up after every unfinished run of `db` (the caller holds the database's slot,
    so their runs are dead), except the caller's own record `own`: drop the databases
    they created and never promoted, put production back or finish a swap, start the
    services they stopped. Returns one line per thing done, also passed to `say`."""
    done: list[str] = []

    def tell(line: str) -> None:
        done.append(line)
        say(line)

    for record in journal.unfinished(store, db.name):
        if record.id == own:
            continue
        who = f"{record.flow} run {record.flow_run_name or record.flow_run_id or record.id} (step: {record.step})"
        outcome = _settle(db, record, tell, who)
        for name in record.services_stopped:
            try:
                start_service.fn(settings.controller(name))
                wait_ready(settings, [name])
                tell(f"started service {name} again, which {who} had stopped")
            except Exception as exc:  # noqa: BLE001 - reported, the record stays open
                tell(f"could not start service {name} (stopped by {who}): {first_line(exc)}")
                outcome = ""
        if outcome:
            journal.close(store, record, outcome)
    return done


def _settle(db: Database, record: RunRecord, tell: Callable[[str], None], who: str) -> str:
    production = record.production or db.dbname
    if record.side_schema:
        with postgres.connect(db, dbname=production, autocommit=True) as conn:
            if schema_exists(conn, record.aside_schema or ""):
                tell(f"{who} had swapped its tables in; the replaced rows are kept in schema {record.aside_schema}")
            if schema_exists(conn, record.side_schema):
                conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(record.side_schema)))
                tell(f"dropped schema {record.side_schema} of {production}, left by {who}")
    swapped = bool(record.aside and postgres.database_exists(db, record.aside))
    if swapped:
        tell(f"{who} had completed the swap: {production} is the restored database, the original "
             f"is kept as {record.aside}; finishing it (services started below)")
        outcome = "finished by a later run"
    else:
        outcome = "undone by a later run: production was never renamed"
    for name in record.databases:
        if name == production or name == record.aside:
            continue
        if postgres.database_exists(db, name):
            postgres.drop_database(db, name)
            tell(f"dropped {name}, left by {who}" + ("" if swapped else "; production was never touched"))
    if not record.databases and not swapped:
        tell(f"{who} had created nothing")
    return outcome


# --- restoring single tables ---------------------------------------------------------------

def resolve_tables(names: list[str], manifest: Manifest) -> list[str]:
    """`orders` or `public.orders` -> `public.orders`, as the backup has it; anything the
    backup does not hold is refused, listing what it does hold."""
    out = []
    for name in names:
        found = [t for t in manifest.tables if t == name or t.split(".", 1)[1] == name]
        if len(found) != 1:
            why = "is ambiguous" if found else "is not in the backup"
            raise RecoveryError(f"table {name!r} {why} ({manifest.id} holds: {', '.join(sorted(manifest.tables))}); "
                                "nothing was changed")
        if found[0] not in out:
            out.append(found[0])
    return out


def schema_exists(conn, name: str) -> bool:  # type: ignore[no-untyped-def]
    return conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (name,)).fetchone() is not None


def _columns(conn, table: str) -> list[str]:  # type: ignore[no-untyped-def]
    """The columns a row copy writes (not dropped, not generated), in table order."""
    rows = conn.execute("""SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0
                           AND NOT attisdropped AND attgenerated = '' ORDER BY attnum""",
                        (_qualified(table).as_string(conn),)).fetchall()
    return [r[0] for r in rows]


def _qualified(table: str) -> sql.Identifier:
    schema, name = table.split(".", 1)
    return sql.Identifier(schema, name)


def check_row_replacement(db: Database) -> None:
    """A table restore replaces rows with foreign-key triggers off (so that no ON DELETE
    CASCADE reaches other tables): the role must be allowed to do that."""
    try:
        with postgres.connect(db) as conn:
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.rollback()
    except (DatabaseError, DatabaseUnavailable):
        raise
    except Exception as exc:  # noqa: BLE001 - psycopg's InsufficientPrivilege
        raise RecoveryError(f"{db.describe()}: restoring single tables needs a role that may set "
                            f"session_replication_role (a superuser, or rds_superuser on RDS): "
                            f"{first_line(exc)}; nothing was changed") from None


@task(name="stage-tables", cache_policy=NO_CACHE)
def stage_tables(db: Database, restored: str, side: str, tables: list[str]) -> None:
    """Copy each table from the restored copy into schema `side` of production (binary
    COPY, the production table's structure and indexes)."""
    with postgres.connect(db) as live, postgres.connect(db, dbname=restored) as src:
        live.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(side)))
        for table in tables:
            if not live.execute("SELECT to_regclass(%s)", (_qualified(table).as_string(live),)).fetchone()[0]:
                raise RecoveryError(f"table {table} does not exist in production (dropped?): restore the whole "
                                    "database instead (leave `tables` empty)")
            cols = _columns(src, table)
            staged = sql.Identifier(side, table.split(".", 1)[1])
            live.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING GENERATED INCLUDING INDEXES)").format(
                staged, _qualified(table)))
            names = sql.SQL(", ").join(map(sql.Identifier, cols))
            with src.cursor().copy(sql.SQL("COPY {} ({}) TO STDOUT (FORMAT BINARY)").format(_qualified(table), names)) as out, \
                    live.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(staged, names)) as into:
                for data in out:
                    into.write(data)
        live.commit()


def verify_tables(conn, schema: str | None, tables: list[str], manifest: Manifest,  # type: ignore[no-untyped-def]
                  db: Database) -> list[str]:
    """Counts and content checksums of `tables` (read from `schema` instead of their own,
    if given) against the manifest, in the connection's transaction."""
    problems = []
    for table in tables:
        where = sql.Identifier(schema, table.split(".", 1)[1]) if schema else _qualified(table)
        got = int(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(where)).fetchone()[0])
        if got != manifest.tables[table]:
            problems.append(f"{table}: {got} rows, manifest says {manifest.tables[table]}")
    wanted = {t: f"{schema}.{t.split('.', 1)[1]}" if schema else t for t in tables if t in manifest.content}
    if wanted:
        sampled = postgres.content_sample(conn, sorted({w.split(".", 1)[0] for w in wanted.values()}),
                                          manifest.sample_percent, tables=list(wanted.values()))
        problems += postgres.compare_content({t: manifest.content[t] for t in wanted},
                                             {t: sampled[w] for t, w in wanted.items() if w in sampled})
    return problems


def swap_tables(db: Database, tables: list[str], side: str, aside: str, manifest: Manifest,
                lock_timeout_seconds: float = 10) -> tuple[float, list[str]]:
    """In one transaction: keep each table's current rows in schema `aside`, replace them
    with the staged ones, check counts and content against the manifest (any difference
    rolls everything back), report rows of other tables whose foreign keys now point
    nowhere, drop the staging schema. Returns (seconds the tables were locked, findings)."""
    with postgres.connect(db) as conn:
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{int(lock_timeout_seconds * 1000)}ms")))
        conn.execute("SET LOCAL session_replication_role = replica")  # no FK cascades into other tables
        t0 = time.monotonic()
        for table in tables:
            conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(_qualified(table)))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(aside)))
        for table in tables:
            name = table.split(".", 1)[1]
            cols = sql.SQL(", ").join(map(sql.Identifier, _columns(conn, table)))
            conn.execute(sql.SQL("CREATE TABLE {} AS TABLE {}").format(sql.Identifier(aside, name), _qualified(table)))
            conn.execute(sql.SQL("DELETE FROM {}").format(_qualified(table)))
            conn.execute(sql.SQL("INSERT INTO {t} ({c}) OVERRIDING SYSTEM VALUE SELECT {c} FROM {s}").format(
                t=_qualified(table), c=cols, s=sql.Identifier(side, name)))
        conn.execute("SET LOCAL session_replication_role = origin")
        problems = verify_tables(conn, None, tables, manifest, db)
        if problems:
            conn.rollback()
            raise RecoveryError("the swapped-in tables differ from the manifest, so the swap was rolled back "
                                f"(production unchanged): {'; '.join(problems[:5])}")
        findings = dangling_references(conn, tables)
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(side)))
        conn.commit()
        return time.monotonic() - t0, findings


def dangling_references(conn, tables: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
    """Rows whose foreign key into or out of `tables` finds no row (the restored tables
    and the rest of the database come from different moments)."""
    fks = conn.execute(
        """SELECT c.conname, cn.nspname, cr.relname, pn.nspname, pr.relname,
                  array(SELECT attname FROM unnest(c.conkey) WITH ORDINALITY k(n, o)
                        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY o),
                  array(SELECT attname FROM unnest(c.confkey) WITH ORDINALITY k(n, o)
                        JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY o)
           FROM pg_constraint c
           JOIN pg_class cr ON cr.oid = c.conrelid JOIN pg_namespace cn ON cn.oid = cr.relnamespace
           JOIN pg_class pr ON pr.oid = c.confrelid JOIN pg_namespace pn ON pn.oid = pr.relnamespace
           WHERE c.contype = 'f' AND (cn.nspname || '.' || cr.relname = ANY(%s) OR pn.nspname || '.' || pr.relname = ANY(%s))""",
        (tables, tables)).fetchall()
    out = []
    for name, cschema, ctable, pschema, ptable, ccols, pcols in fks:
        child, parent = f"{cschema}.{ctable}", f"{pschema}.{ptable}"
        join = sql.SQL(" AND ").join(sql.SQL("p.{} = c.{}").format(sql.Identifier(pc), sql.Identifier(cc))
                                     for cc, pc in zip(ccols, pcols))
        notnull = sql.SQL(" AND ").join(sql.SQL("c.{} IS NOT NULL").format(sql.Identifier(cc)) for cc in ccols)
        q = sql.SQL("SELECT count(*) FROM {child} c WHERE {nn} AND NOT EXISTS (SELECT 1 FROM {parent} p WHERE {j})").format(
            child=sql.Identifier(cschema, ctable), parent=sql.Identifier(pschema, ptable), nn=notnull, j=join)
        n = int(conn.execute(q).fetchone()[0])
        if n:
            out.append(f"{child}: {n} rows reference {parent} rows that are not there (foreign key {name})")
    return out


def table_reconciliation(db: Database, aside: str, tables: list[str], manifest: Manifest) -> list[str]:
    """Per table: what the kept rows (schema `aside`) hold against the restored ones."""
    lines = []
    with postgres.connect(db) as conn:
        for table in tables:
            name = table.split(".", 1)[1]
            before = int(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(aside, name))).fetchone()[0])
            after = manifest.tables[table]
            lines.append(f"{table}: replaced rows {before}, restored {after} ({after - before:+d}); "
                         f"the replaced rows are in {aside}.{name}")
    return lines


# --- cleanup -------------------------------------------------------------------------------

class Leftover(BaseModel):
    name: str
    kind: str  # pre-restore copy | abandoned restore | abandoned restore test
    created: datetime | None
    size_bytes: int = 0


def leftovers(db: Database, store: Store, older_than_days: float, now: datetime) -> list[Leftover]:
    """Pre-restore copies older than `older_than_days`, and restore databases no live run
    records (call after settle_abandoned)."""
    live = {n for r in journal.unfinished(store, db.name) for n in r.databases}
    prefix = db.dbname[:NAME_ROOM]
    pattern = re.compile(re.escape(prefix) + r"(_pre_restore_|_restore_|_restoretest_)(\S+)")
    with postgres.connect(db, dbname="postgres") as conn:
        rows = conn.execute("SELECT datname, pg_database_size(oid) FROM pg_database WHERE datname LIKE %s",
                            (prefix.replace("_", r"\_").replace("%", r"\%") + "%",)).fetchall()
    out = []
    for name, size in rows:
        match = pattern.fullmatch(name)
        if not match or name in live or name == db.dbname:
            continue
        try:
            created = datetime.strptime(match.group(2), STAMP).replace(tzinfo=timezone.utc)
        except ValueError:
            created = None
        kind = {"_pre_restore_": "pre-restore copy", "_restore_": "abandoned restore",
                "_restoretest_": "abandoned restore test"}[match.group(1)]
        if kind == "pre-restore copy" and (created is None or now - created < timedelta(days=older_than_days)):
            continue
        out.append(Leftover(name=name, kind=kind, created=created, size_bytes=int(size)))
    return sorted(out, key=lambda x: x.name)
