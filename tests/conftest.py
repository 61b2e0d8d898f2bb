"""Shared fixtures: real PostgreSQL, S3/KMS through moto's server on loopback, a Prefect
test server, and a runbooks.toml written per test."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

ADMIN_DSN = os.environ.get("RUNBOOKS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def pytest_configure(config: pytest.Config) -> None:
    from deployments.environment import quiet_prefect

    quiet_prefect()
    os.environ["RUNBOOKS_RETRY_DELAY_SCALE"] = "0.01"  # real retries, without the waiting


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> Iterator[None]:
    """One Prefect server (SQLite) for the session: flows run through the real engine."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def need(condition: bool, reason: str) -> None:
    """Skip for a missing binary or service, except under CI where nothing may skip."""
    if not condition:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must provide this: {reason}")
        pytest.skip(reason)


def _reachable(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
        return True
    except psycopg.OperationalError:
        return False


@pytest.fixture(scope="session")
def pg_admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The admin DSN of the shared PostgreSQL server; where none runs (and not under CI,
    which must provide one), an embedded PostgreSQL 16 for the session."""
    if _reachable(ADMIN_DSN):
        yield ADMIN_DSN
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must provide PostgreSQL at {ADMIN_DSN}")
    import pgserver

    root = tmp_path_factory.mktemp("pg")
    root.chmod(0o777)  # as root, pgserver runs PostgreSQL as its own user
    server = pgserver.get_server(root / "data", cleanup_mode="stop")
    yield f"host={root / 'data'} user=postgres dbname=postgres"
    server.cleanup()


def _create_database(admin: str, prefix: str) -> tuple[str, str]:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, psycopg.conninfo.make_conninfo(admin, dbname=name)


def _drop_databases(admin: str, names: list[str]) -> None:
    """Drop each database and whatever runs derived from it (restore-test scratch, renamed copies)."""
    with psycopg.connect(admin, autocommit=True) as conn:
        for name in names:
            for (dbname,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                          (f"{name}%",)).fetchall():
                conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


@contextmanager
def sample_database(admin: str, prefix: str, rows: int = 3000) -> Iterator[str]:
    """A new database with the demo's sample data, for the block (e2e runs, benchmarks)."""
    from demo.sample_data import build

    name, dsn = _create_database(admin, prefix)
    try:
        build(dsn, rows=rows)
        yield dsn
    finally:
        _drop_databases(admin, [name])


@pytest.fixture
def make_database(pg_admin: str) -> Iterator:
    """Factory: a new empty database with a unique name; dropped (with its restore-test
    leftovers) after the test."""
    created: list[str] = []

    def make(prefix: str = "rb_t") -> str:
        name, dsn = _create_database(pg_admin, prefix)
        created.append(name)
        return dsn

    yield make
    _drop_databases(pg_admin, created)


@pytest.fixture
def sample_db(make_database) -> str:
    """A database with the demo schema and about 3,000 rows."""
    from demo.sample_data import build

    dsn = make_database()
    build(dsn, rows=3000)
    return dsn


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """S3 and KMS through moto's standalone server on loopback."""
    from moto.server import ThreadedMotoServer

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ[key] = value
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{server._server.server_port}"
    server.stop()


@pytest.fixture
def bucket(moto_endpoint: str) -> str:
    import boto3

    name = f"rb-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def kms_key(moto_endpoint: str) -> str:
    import boto3

    kms = boto3.client("kms", endpoint_url=moto_endpoint, region_name="us-east-1")
    return kms.create_key(Description="runbooks test")["KeyMetadata"]["KeyId"]


@pytest.fixture
def write_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Factory: write a runbooks.toml and point RUNBOOKS_CONFIG at it."""

    def write(text: str) -> Path:
        path = tmp_path / "runbooks.toml"
        path.write_text(text)
        monkeypatch.setenv("RUNBOOKS_CONFIG", str(path))
        return path

    return write


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


from tests.pagerduty_standin import pagerduty  # noqa: E402,F401 - fixtures for every test
from tests.security_stack import security_stack  # noqa: E402,F401
from tests.slack_standin import _no_proxy, slack  # noqa: E402,F401


@pytest.fixture
def prometheus(tmp_path: Path):
    """Factory: a real Prometheus (Debian's package) scraping `{job: "host:port"}` every
    second; returns its URL. Stopped after the test."""
    import shutil
    import subprocess
    import time

    import httpx

    binary = shutil.which("prometheus")
    need(binary is not None, "prometheus is not installed (apt-get install prometheus)")
    started: list[subprocess.Popen] = []

    def start(targets: dict[str, str]) -> str:
        jobs = "".join(f"  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"
                       for job, addr in targets.items())
        config = tmp_path / "prometheus.yml"
        config.write_text(f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{jobs}")
        port = free_port()
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"prometheus did not start: {(tmp_path / 'prometheus.log').read_text()[-500:]}")

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=10)
