"""Everything that touches PostgreSQL: connections, pg_dump, pg_restore, pg_amcheck,
exact row counts and sequence values, scratch databases.

The DSN is a secret: it is passed to the PostgreSQL tools through the environment
(PGPASSWORD), never on a command line, and shown only through `mask_dsn`.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from tasks.errors import DatabaseError, DatabaseUnavailable, IntegrityError, VerificationError
from tasks.pitr import PitrConfig
from tasks.retries import is_transient
from tasks.streams import ahead

CHUNK = 1 << 20  # bytes read from pg_dump at a time
LOCK_WAIT_MS = 120_000  # pg_dump's wait for its table locks


class DatabaseConfig(BaseModel):
    """`[databases.<name>]`: one PostgreSQL database we back up and restore."""

    model_config = ConfigDict(extra="forbid")

    dsn: SecretStr = Field(description="libpq URI or key=value DSN (a secret)")
    bin_dir: Path | None = Field(None, description="directory with pg_dump/pg_restore/pg_amcheck")
    schemas: list[str] = Field(default_factory=lambda: ["public"], min_length=1)
    store: str | None = Field(None, description="store its backups go to (may be omitted when "
                                                "only one store is configured)")
    retention_days: int = Field(30, ge=1)
    jobs: int = Field(2, ge=1, le=32, description="parallel pg_restore jobs")
    compression_level: int = Field(3, ge=1, le=19, description="zstd level")
    connect_timeout: int = Field(10, ge=1, le=300)
    content_sample_percent: float = Field(1.0, ge=0, le=100, description="share of each table's rows "
                                          "(chosen by hashed primary key) whose checksum the backup's "
                                          "manifest records and every restore compares; 0: counts only")
    pitr: PitrConfig | None = Field(None, description="point-in-time recovery through pgBackRest "
                                    "(the cluster, its repositories, retention)")

    @field_validator("dsn")
    @classmethod
    def _parsable(cls, dsn: SecretStr) -> SecretStr:
        """Reject a malformed DSN here, with a message that never quotes it."""
        try:
            conninfo_to_dict(dsn.get_secret_value())
        except psycopg.ProgrammingError:
            raise ValueError("not a valid libpq DSN or postgresql:// URI (value not shown)") from None
        return dsn


@dataclass
class Database:
    """A configured database, resolved by name."""

    name: str
    config: DatabaseConfig

    @property
    def dsn(self) -> str:
        return self.config.dsn.get_secret_value()

    @property
    def masked_dsn(self) -> str:
        return mask_dsn(self.dsn)

    @property
    def dbname(self) -> str:
        """The database name libpq will use (it defaults to the user name)."""
        params = conninfo_to_dict(self.dsn)
        return params.get("dbname") or os.environ.get("PGDATABASE") or params.get("user") \
            or os.environ.get("PGUSER") or "postgres"

    def describe(self) -> str:
        return f"database '{self.name}' ({self.masked_dsn})"


SECRET_KEYS = ("password", "sslpassword")


def mask_dsn(dsn: str) -> str:
    """The DSN with its secrets replaced by ***, for logs and messages."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    for key in SECRET_KEYS:
        if key in params:
            params[key] = "***"
    return " ".join(f"{k}={v}" for k, v in params.items() if v is not None)


def _scrub(text: str, db: Database) -> str:
    """The first line of a message, with any secret of the DSN removed should a tool echo it."""
    first = (text.strip().splitlines() or [""])[0] if text else ""
    params = conninfo_to_dict(db.dsn)
    for key in SECRET_KEYS:
        if params.get(key):
            first = first.replace(str(params[key]), "***")
    return first


def connect(db: Database, dbname: str | None = None, autocommit: bool = False) -> psycopg.Connection:
    """Open a connection (to another database on the same server if `dbname`)."""
    params = {"connect_timeout": db.config.connect_timeout, "application_name": "prefect-runbooks"}
    if dbname:
        params["dbname"] = dbname
    try:
        return psycopg.connect(make_conninfo(db.dsn, **params), autocommit=autocommit)
    except psycopg.OperationalError as exc:
        # `from None`: the original carries the conninfo in its chain of causes.
        message = f"{db.describe()}: cannot connect: {_scrub(str(exc), db)}"
        if is_transient(exc):  # refused, timed out: worth a retry, unlike a bad password
            raise DatabaseUnavailable(message) from None
        raise DatabaseError(message) from None


def _tool_env(db: Database, dbname: str | None = None) -> tuple[str, dict[str, str]]:
    """A conninfo without the password, and an environment that carries it."""
    params = conninfo_to_dict(db.dsn)
    password = params.pop("password", None)
    if dbname:
        params["dbname"] = dbname
    params.setdefault("connect_timeout", str(db.config.connect_timeout))
    env = dict(os.environ)  # an inherited PGPASSWORD/PGPASSFILE still applies ...
    if password:  # ... unless the DSN carries its own
        env["PGPASSWORD"] = str(password)
    return make_conninfo("", **params), env


def find_tool(db: Database, name: str) -> Path:
    """Locate a PostgreSQL client tool: bin_dir if set; otherwise, among Debian's
    installed versions, pgserver's and PATH, the one made for the server's major version
    (else the oldest newer one: pg_dump refuses servers newer than itself)."""
    if db.config.bin_dir:
        path = db.config.bin_dir / name
        if path.is_file():
            return path
        raise DatabaseError(f"{db.describe()}: {name} not found in bin_dir {db.config.bin_dir}")
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    embedded = importlib.util.find_spec("pgserver")  # ships its own client tools; not imported
    if embedded and embedded.submodule_search_locations:
        candidates += [str(Path(loc) / "pginstall" / "bin" / name) for loc in embedded.submodule_search_locations]
    if on_path := shutil.which(name):
        candidates.append(on_path)
    found = [Path(c) for c in candidates if Path(c).is_file() and os.access(c, os.X_OK)]
    if not found:
        raise DatabaseError(f"{db.describe()}: {name} not found (install the PostgreSQL client or set bin_dir)")
    server = _server_major(db.dsn, db.config.connect_timeout)

    def fitness(path: Path) -> tuple[int, int]:
        major = _tool_major(str(path))
        if server is None:
            return (0, -major)  # unknown server: the newest tool
        return (0 if major == server else 1 if major > server else 2, abs(major - server))

    return min(found, key=fitness)


@functools.lru_cache(maxsize=64)
def _tool_major(path: str) -> int:
    match = re.search(r"\) (\d+)", tool_version(Path(path)))
    return int(match.group(1)) if match else 0


@functools.lru_cache(maxsize=64)
def _server_major(dsn: str, timeout: int) -> int | None:
    try:
        with psycopg.connect(make_conninfo(dsn, connect_timeout=timeout)) as conn:
            return int(conn.info.server_version) // 10000
    except psycopg.Error:
        return None  # the caller's own connection will report the problem


def tool_version(path: Path) -> str:
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


class ContentSample(BaseModel):
    """A checksum of the rows of one table whose hashed primary key falls in the sample:
    the same rows and the same checksum in any copy of the same data, whatever its
    physical order (the reference's "spot-check random records", made exact)."""

    key: list[str]  # the primary key's columns
    rows: int
    checksum: str  # md5 over the md5 of each sampled row's text, in key order


class DatabaseState(BaseModel):
    """Exact row counts and sequence values of a database at one snapshot."""

    tables: dict[str, int] = Field(default_factory=dict)
    sequences: dict[str, int] = Field(default_factory=dict)
    server_version: str = ""
    size_bytes: int = 0
    content: dict[str, ContentSample] = Field(default_factory=dict)
    sample_percent: float = 0.0

    @property
    def total_rows(self) -> int:
        return sum(self.tables.values())


def _relations(conn: psycopg.Connection, schemas: list[str], kind: str) -> list[tuple[str, str]]:
    return conn.execute(
        """SELECT n.nspname, c.relname FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = ANY(%s) AND c.relkind = %s ORDER BY 1, 2""",
        (schemas, kind)).fetchall()


def read_sequences(conn: psycopg.Connection, schemas: list[str]) -> dict[str, int]:
    """The last value handed out by every sequence in `schemas`."""
    out = {}
    q = sql.SQL("SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM {}")
    for schema, name in _relations(conn, schemas, "S"):
        out[f"{schema}.{name}"] = int(conn.execute(q.format(sql.Identifier(schema, name))).fetchone()[0])
    return out


def read_state(conn: psycopg.Connection, schemas: list[str],
               sequences: dict[str, int] | None = None) -> DatabaseState:
    """Exact `count(*)` of every table and the value of every sequence in `schemas`
    (sequences read here unless already read by the caller)."""
    state = DatabaseState(
        server_version=str(conn.execute("SHOW server_version").fetchone()[0]),
        size_bytes=int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]),
        sequences=sequences if sequences is not None else read_sequences(conn, schemas),
    )
    for schema, name in _relations(conn, schemas, "r"):
        q = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, name))
        state.tables[f"{schema}.{name}"] = int(conn.execute(q).fetchone()[0])
    return state


SAMPLE_BUCKETS = 65536  # the sample: rows whose key hashes (low 16 bits) below share x 65536
# The text of a row depends on these settings; fixing them makes a checksum comparable
# between the backup's snapshot and any restore of it.
_STABLE_TEXT = ("SET LOCAL TimeZone = 'UTC'", "SET LOCAL DateStyle = 'ISO, YMD'",
                "SET LOCAL IntervalStyle = 'postgres'", "SET LOCAL bytea_output = 'hex'",
                "SET LOCAL extra_float_digits = 1")
# The planner guesses a third of the rows pass the sample's filter (1 % do) and so
# prices a parallel scan too high; these make it choose one (about 1.6x faster on 2 CPUs).
_PARALLEL_SCAN = ("SET LOCAL parallel_setup_cost = 0", "SET LOCAL parallel_tuple_cost = 0.001")


def primary_keys(conn: psycopg.Connection, schemas: list[str]) -> dict[str, list[str]]:
    """Each table's primary key columns, in key order (tables without one are absent)."""
    rows = conn.execute(
        """SELECT n.nspname, c.relname, a.attname FROM pg_index i
           JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
           CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
           WHERE i.indisprimary AND n.nspname = ANY(%s) AND c.relkind = 'r'
           ORDER BY 1, 2, k.ord""", (schemas,)).fetchall()
    keys: dict[str, list[str]] = {}
    for schema, table, column in rows:
        keys.setdefault(f"{schema}.{table}", []).append(column)
    return keys


def content_sample(conn: psycopg.Connection, schemas: list[str], percent: float,
                   tables: list[str] | None = None) -> dict[str, ContentSample]:
    """Checksums of the sampled rows of every table with a primary key (in `tables` only,
    if given), in the connection's current transaction. Cost: one scan of each table
    (PostgreSQL's hashtextextended of every key, 3x cheaper than md5; md5 of each sampled
    row). hashtextextended is stable across versions: hash partitioning relies on it."""
    if percent <= 0:
        return {}
    threshold = max(1, round(SAMPLE_BUCKETS * min(percent, 100.0) / 100.0))
    own = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    if own:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        for statement in _STABLE_TEXT + _PARALLEL_SCAN:
            conn.execute(statement)
        out = {}
        for table, key in primary_keys(conn, schemas).items():
            if tables is not None and table not in tables:
                continue
            schema, name = table.split(".", 1)
            cols = sql.SQL(", ").join(sql.SQL("t.") + sql.Identifier(c) for c in key)
            keytext = sql.SQL("ROW({})::text").format(cols)
            # The scan in a subquery, so PostgreSQL can run it in parallel workers (an
            # ordered aggregate cannot be); only the sampled rows reach the aggregate.
            keys = sql.SQL(", ").join(sql.Identifier(f"k{i}") for i in range(len(key)))
            named = sql.SQL(", ").join(sql.SQL("t.{} AS {}").format(sql.Identifier(c), sql.Identifier(f"k{i}"))
                                       for i, c in enumerate(key))
            q = sql.SQL("""SELECT count(*), coalesce(md5(string_agg(h, '' ORDER BY {keys})), '')
                           FROM (SELECT {named}, md5(t::text) AS h FROM {table} AS t
                                 WHERE (hashtextextended({keytext}, 0) & 65535) < {threshold}) AS s""").format(
                keys=keys, named=named, table=sql.Identifier(schema, name), keytext=keytext,
                threshold=sql.Literal(threshold))
            rows, checksum = conn.execute(q).fetchone()
            out[table] = ContentSample(key=key, rows=int(rows), checksum=str(checksum))
        return out
    finally:
        if own:
            conn.rollback()


def compare_content(expected: dict[str, ContentSample], got: dict[str, ContentSample]) -> list[str]:
    """Every table whose sampled rows differ, one line each."""
    problems = []
    for table, want in sorted(expected.items()):
        have = got.get(table)
        if have is None:
            problems.append(f"{table}: no primary key or missing, its sampled rows cannot be compared")
        elif have.rows != want.rows:
            problems.append(f"{table}: {have.rows} sampled rows, the manifest has {want.rows}")
        elif have.checksum != want.checksum:
            problems.append(f"{table}: the content of its {want.rows} sampled rows differs from the manifest")
    return problems


def estimate_dump_bytes(db: Database) -> int:
    """About what pg_dump will write: the tables' heap and TOAST size (no indexes)."""
    with connect(db) as conn:
        row = conn.execute(
            """SELECT coalesce(sum(pg_table_size(c.oid)), 0) FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = ANY(%s) AND c.relkind = 'r'""", (db.config.schemas,)).fetchone()
    return int(row[0]) if row else 0


@dataclass
class DumpStream:
    """A running pg_dump: its output chunks, and the state of its snapshot."""

    chunks: Iterator[bytes]
    state: DatabaseState = field(default_factory=DatabaseState)
    pg_dump_version: str = ""


@contextmanager
def dump(db: Database) -> Iterator[DumpStream]:
    """Run `pg_dump -Fc -Z0` in an exported snapshot and yield its output as it comes.

    Row counts are read in the same snapshot, in a thread, while the dump streams.
    Sequences are not transactional, so they are read before pg_dump starts: the
    manifest's value is then never above what the dump holds. On leaving, pg_dump's
    exit code is checked; any failure kills it.
    """
    pg_dump = find_tool(db, "pg_dump")
    conn = connect(db)
    proc: subprocess.Popen[bytes] | None = None
    result: DumpStream | None = None
    counter: threading.Thread | None = None
    try:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        snapshot = str(conn.execute("SELECT pg_export_snapshot()").fetchone()[0])
        sequences = read_sequences(conn, db.config.schemas)
        conninfo, env = _tool_env(db)
        stderr = _Tail()
        proc = subprocess.Popen(
            [str(pg_dump), "--format=custom", "--compress=0", f"--snapshot={snapshot}",
             # Fail rather than wait forever behind an exclusive lock on a table.
             f"--lock-wait-timeout={LOCK_WAIT_MS}", "--no-sync", f"--dbname={conninfo}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )
        stderr.follow(proc.stderr)
        _widen_pipe(proc.stdout)
        state = DumpStream(chunks=iter(()), pg_dump_version=tool_version(pg_dump))
        counted: list[BaseException] = []

        def count() -> None:
            try:
                state.state = read_state(conn, db.config.schemas, sequences)
                percent = db.config.content_sample_percent
                state.state.content = content_sample(conn, db.config.schemas, percent)
                state.state.sample_percent = percent
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                counted.append(exc)

        counter = threading.Thread(target=count, name="row-counts", daemon=True)
        counter.start()

        def chunks() -> Iterator[bytes]:
            assert proc is not None and proc.stdout is not None
            yield from _read_ahead(proc.stdout)
            code = proc.wait()
            counter.join()
            if code != 0:
                reason = stderr.text()
                error = DatabaseUnavailable if _passing(reason) else DatabaseError
                raise error(f"{db.describe()}: pg_dump failed (exit {code}): {_scrub(reason, db)}")
            if counted:
                error = DatabaseUnavailable if is_transient(counted[0]) else DatabaseError
                raise error(f"{db.describe()}: reading row counts failed: {_scrub(str(counted[0]), db)}")

        state.chunks = chunks()
        result = state
        yield result
    finally:
        if result is not None:
            result.chunks.close()  # stops the read-ahead thread if the consumer gave up
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc is not None and proc.stdout:
            proc.stdout.close()
        if counter is not None and counter.is_alive():
            conn.cancel()  # the counting thread must not outlive its connection
            counter.join(timeout=30)
        conn.close()


_PASSING = ("could not obtain lock", "due to statement timeout", "due to lock timeout",
            "server closed the connection", "terminating connection",
            "connection to server", "could not connect", "the database system is shutting down",
            "canceling statement due to conflict with recovery")


def _passing(stderr: str) -> bool:
    """A pg_dump failure that a later attempt may not meet (locks, lost connections)."""
    text = stderr.lower()
    if any(p in text for p in ("password authentication", "does not exist", "permission denied")):
        return False  # a connection refused for cause: retrying cannot help
    return any(p in text for p in _PASSING)


def _widen_pipe(stream) -> None:  # type: ignore[no-untyped-def]
    """A 1 MiB pipe instead of 64 KiB, so pg_dump keeps writing while we compress."""
    try:
        import fcntl

        fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, CHUNK)
    except (ImportError, AttributeError, OSError):
        pass  # not Linux, or over the system's limit: slower, still correct


def _read_ahead(stream, depth: int = 8) -> Iterator[bytes]:  # type: ignore[no-untyped-def]
    """Read `stream` in a thread, up to `depth` chunks ahead of the consumer, so reading
    overlaps compression and upload. Memory: depth x CHUNK."""
    return ahead(iter(lambda: stream.read(CHUNK), b""), depth)


class _Tail:
    """Collects the last lines a subprocess writes to stderr, without blocking it."""

    def __init__(self, limit: int = 8192) -> None:
        self._buf = b""
        self._limit = limit
        self._thread: threading.Thread | None = None

    def follow(self, stream) -> None:  # type: ignore[no-untyped-def]
        def pump() -> None:
            for line in iter(stream.readline, b""):
                self._buf = (self._buf + line)[-self._limit:]
            stream.close()

        self._thread = threading.Thread(target=pump, daemon=True)
        self._thread.start()

    def text(self) -> str:
        if self._thread:
            self._thread.join(timeout=5)
        return _first(self._buf, newest=True)


def restore_list(db: Database, archive: Path | None, stdin_chunks: Iterator[bytes] | None = None,
                 timeout: float = 600, pass_fds: tuple[int, ...] = ()) -> list[str]:
    """`pg_restore --list`: the archive's table of contents (proves it is readable)."""
    pg_restore = find_tool(db, "pg_restore")
    args = [str(pg_restore), "--list"] + ([str(archive)] if archive else [])
    proc = subprocess.Popen(args, stdin=subprocess.PIPE if archive is None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds)
    out, err = _feed(proc, stdin_chunks, timeout)
    if proc.returncode != 0:
        raise IntegrityError(f"the archive is unreadable: pg_restore --list failed "
                             f"(exit {proc.returncode}): {_first(err)}")
    return [ln for ln in out.decode(errors="replace").splitlines() if ln and not ln.startswith(";")]


def _feed(proc: subprocess.Popen[bytes], chunks: Iterator[bytes] | None,
          timeout: float) -> tuple[bytes, bytes]:
    """Write `chunks` to the process's stdin while collecting its output."""
    out: list[bytes] = []
    err: list[bytes] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err)) if s is not None]
    for r in readers:
        r.start()
    if chunks is not None and proc.stdin is not None:
        try:
            for chunk in chunks:
                proc.stdin.write(chunk)
        except BrokenPipeError:
            pass  # the tool stopped reading (e.g. --list needs only the header)
        except BaseException:  # the input failed (e.g. a corrupt backup): stop the tool
            proc.kill()
            proc.wait()
            for r in readers:
                r.join()
            raise
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    for r in readers:
        r.join()
    return b"".join(out), b"".join(err)


def _first(err: bytes, newest: bool = False) -> str:
    """Up to three of a tool's error lines (all its lines if none says "error")."""
    lines = err.decode(errors="replace").strip().splitlines()
    errors = [ln for ln in lines if "error" in ln.lower()] or lines
    return " | ".join(errors[-3:] if newest else errors[:3]) or "no message"


def create_database(db: Database, name: str) -> None:
    """Create an empty database on the same server (fails if it exists)."""
    with connect(db, dbname="postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(db: Database, name: str) -> None:
    """Drop a database we created (scratch databases only), if it exists."""
    if name == db.dbname:
        raise DatabaseError(f"{db.describe()}: refusing to drop the production database '{name}'")
    with connect(db, dbname="postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def database_exists(db: Database, name: str) -> bool:
    with connect(db, dbname="postgres", autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is not None


def pg_restore(db: Database, target_dbname: str, archive: Path, jobs: int = 1,
               timeout: float = 6 * 3600, pass_fds: tuple[int, ...] = ()) -> None:
    """Restore an archive file into `target_dbname` (--exit-on-error, `jobs` in parallel)."""
    tool = find_tool(db, "pg_restore")
    conninfo, env = _tool_env(db, dbname=target_dbname)
    args = [str(tool), "--exit-on-error", "--no-owner", f"--dbname={conninfo}", f"--jobs={jobs}", str(archive)]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, pass_fds=pass_fds)
    _, err = _feed(proc, None, timeout)
    if proc.returncode != 0:
        reason = _first(err)
        error = DatabaseUnavailable if _passing(reason) else DatabaseError
        raise error(f"{db.describe()}: pg_restore into '{target_dbname}' failed "
                    f"(exit {proc.returncode}): {_scrub(reason, db)}")


def database_size(db: Database) -> int:
    with connect(db) as conn:
        return int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])


def can_create_database(db: Database) -> bool:
    """Whether the role may create the scratch database a restore test needs."""
    with connect(db, dbname="postgres") as conn:
        row = conn.execute(
            "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    return bool(row and row[0])


def amcheck(db: Database, dbname: str, timeout: float = 3600, install: bool = True) -> str | None:
    """Run pg_amcheck (heap pages and B-tree indexes, every index entry against its heap
    tuple) on `dbname`, two jobs at a time.

    Returns None when it cannot run here (no pg_amcheck, no amcheck extension, or a role
    that may not install it), "ok" when it found nothing, and raises with its findings.
    `install=False` for a read-only server (paused in recovery): only where it is installed.
    """
    try:
        tool = find_tool(db, "pg_amcheck")
    except DatabaseError:
        return None
    conninfo, env = _tool_env(db, dbname=dbname)
    with connect(db, dbname=dbname, autocommit=True) as conn:
        installed, available, superuser = conn.execute(
            """SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'amcheck'),
                      EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'amcheck'),
                      (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)""").fetchone()
    if not installed and not (install and available and superuser):
        return None
    # The database is given as a full connection string: pg_amcheck 16 ignores the host
    # of --maintenance-db for the database it checks.
    proc = subprocess.run([str(tool), "--install-missing", "--heapallindexed", "--jobs=2", conninfo],
                          capture_output=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise VerificationError(f"{db.describe()}: pg_amcheck found problems in '{dbname}': "
                                f"{_scrub(_first(proc.stdout + proc.stderr), db)}")
    return "ok"
