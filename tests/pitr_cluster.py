"""A PostgreSQL cluster of its own (initdb from the installed server, run as the
postgres user on a free port) archiving through pgBackRest: to a local repository, and
to S3 on moto's server over TLS when asked. Removed with everything it made."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg

from tests.conftest import free_port, need

APP_DB = "app"


@dataclass
class PitrCluster:
    name: str
    base: Path
    data_dir: Path
    port: int
    bin_dir: Path
    config: Path  # runbooks.toml

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{APP_DB}"

    def sql(self, query: str, *args: object) -> list[tuple]:
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(query, args or None)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def as_postgres(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True,
                              check=check, cwd="/")

    def pg_ctl(self, *args: str, data_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
        return self.as_postgres(str(self.bin_dir / "pg_ctl"), *args, "-D", str(data_dir or self.data_dir),
                                check=False)


def _bin_dir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    need(bool(found) and shutil.which("pgbackrest") is not None and os.geteuid() == 0,
         "PostgreSQL server binaries, pgbackrest and root (to run the cluster as postgres)")
    return found[-1].parent


def pitr_toml(name: str, cluster: PitrCluster, archive_timeout: int, s3: dict | None, extra: str = "") -> str:
    repos = '{ store = "pitrlocal" }'
    text = f'[stores.pitrlocal]\nkind = "local"\npath = "{cluster.base / "repo"}"\n'
    if s3:
        text += (f'[stores.pitrs3]\nkind = "s3"\nbucket = "{s3["bucket"]}"\nendpoint_url = "{s3["endpoint"]}"\n'
                 f'sse_kms_key_id = "{s3["kms_key"]}"\nprefix = "dr-copy"\n')
        repos += ', { store = "pitrs3", verify_tls = false, cipher_pass = "test-cipher-passphrase" }'
    text += (f'[databases.{name}]\ndsn = "{cluster.dsn}"\nstore = "pitrlocal"\nbin_dir = "{cluster.bin_dir}"\n'
             f'[databases.{name}.pitr]\ndata_dir = "{cluster.data_dir}"\nport = {cluster.port}\n'
             f'socket_dir = "{cluster.base}"\nconfig_file = "{cluster.base / "pgbackrest.conf"}"\n'
             f'log_dir = "{cluster.base / "log"}"\narchive_timeout = {archive_timeout}\n'
             f'recovery_timeout_seconds = 120\nrepos = [{repos}]\n{extra}')
    return text


@contextmanager
def pitr_cluster(name: str = "pitrdb", archive_timeout: int = 2, s3: dict | None = None,
                 extra: str = "", set_up: bool = True) -> Iterator[PitrCluster]:
    """A running cluster with an `app` database, set up for PITR (`runbooks pitr setup`
    through the library) unless not `set_up`, RUNBOOKS_CONFIG pointing at its runbooks.toml."""
    bin_dir = _bin_dir()
    base = Path(tempfile.mkdtemp(prefix="rb-pitr-", dir="/tmp"))
    pg = pwd.getpwnam("postgres")
    os.chown(base, pg.pw_uid, pg.pw_gid)
    base.chmod(0o755)
    cluster = PitrCluster(name, base, base / "data", free_port(), bin_dir, base / "runbooks.toml")
    old_config = os.environ.get("RUNBOOKS_CONFIG")
    try:
        cluster.as_postgres(str(bin_dir / "initdb"), "-D", str(cluster.data_dir), "-A", "trust", "-U", "postgres")
        with open(cluster.data_dir / "postgresql.conf", "a") as conf:
            conf.write(f"port = {cluster.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{base}'\nshared_buffers = 32MB\nfsync = off\n")
        started = cluster.pg_ctl("start", "-w", "-l", str(base / "data.log"))
        assert started.returncode == 0, started.stderr
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {APP_DB}")
        cluster.config.write_text(pitr_toml(name, cluster, archive_timeout, s3, extra))
        os.environ["RUNBOOKS_CONFIG"] = str(cluster.config)
        from tasks import pitr
        from tasks.config import load_settings

        if set_up:
            settings = load_settings()
            pitr.setup(settings.stanza(name), settings.database(name).dsn, bin_dir, restart=True)
        yield cluster
    finally:
        if old_config is None:
            os.environ.pop("RUNBOOKS_CONFIG", None)
        else:
            os.environ["RUNBOOKS_CONFIG"] = old_config
        for pid_file in base.glob("*/postmaster.pid"):
            cluster.pg_ctl("stop", "-m", "immediate", data_dir=pid_file.parent)
        shutil.rmtree(base, ignore_errors=True)


def flush_archive(cluster: PitrCluster, timeout: float = 90) -> str:
    """Switch to a new WAL segment and wait until the old one is archived; its name."""
    from tasks import pitr

    segment = pitr.archive_current_segment(cluster.dsn, timeout)
    if segment:
        return segment
    state = cluster.sql("SELECT failed_count, last_failed_wal, last_failed_time FROM pg_stat_archiver")[0]
    logs = sorted((cluster.base / "log").glob("*archive-push*.log"))
    tail = logs[-1].read_text()[-1500:] if logs else "no pgBackRest log"
    raise AssertionError(f"the current WAL segment was not archived in {timeout} s (archiver failures: {state}; "
                         f"pgBackRest: {tail})")


def writes_around_a_target(cluster: PitrCluster, table: str = "t") -> datetime:
    """Row 1 'before', a target time, row 2 'after', all archived: the target to restore to."""
    import time

    cluster.sql(f"INSERT INTO {table} VALUES (1, 'before')")
    time.sleep(0.3)
    target = cluster.sql("SELECT now()")[0][0]
    time.sleep(0.3)
    cluster.sql(f"INSERT INTO {table} VALUES (2, 'after')")
    flush_archive(cluster)
    return target


@contextmanager
def moto_tls(workdir: Path, plain_endpoint: str) -> Iterator[str]:
    """moto's S3 and KMS over HTTPS (pgBackRest speaks nothing else to S3): a TLS proxy
    on loopback, with a self-signed certificate for 127.0.0.1, in front of the plain
    moto server of tests.conftest; the repository sets verify_tls = false."""
    import asyncio
    import ssl
    import threading
    from urllib.parse import urlsplit

    cert, key = workdir / "moto.crt", workdir / "moto.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    upstream = urlsplit(plain_endpoint)
    loop = asyncio.new_event_loop()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(upstream.hostname, upstream.port)
        await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))

    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0, ssl=context))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
