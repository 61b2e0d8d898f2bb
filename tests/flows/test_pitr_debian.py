"""A Debian cluster (pg_createcluster; its postgresql.conf in /etc/postgresql), run by
pg_ctlcluster: set up, restored to a second beside itself, and switched to the latest
WAL, the way a Debian host runs PostgreSQL."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from flows.pitr_restore import pitr_restore
from tasks import pitr
from tasks.config import load_settings
from tests.conftest import free_port, need
from tests.pitr_cluster import PitrCluster, flush_archive, writes_around_a_target


@pytest.fixture
def debian_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[PitrCluster]:
    need(shutil.which("pg_createcluster") is not None and shutil.which("pgbackrest") is not None
         and os.geteuid() == 0, "Debian's postgresql-common, pgbackrest and root")
    version = sorted(os.listdir("/etc/postgresql"), key=int)[-1]
    name, port = f"rbpitr{uuid.uuid4().hex[:6]}", free_port()
    base = Path(tempfile.mkdtemp(prefix="rb-pitr-deb-", dir="/tmp"))
    shutil.chown(base, "postgres", "postgres")
    base.chmod(0o755)
    data_dir = Path(f"/var/lib/postgresql/{version}/{name}")
    try:
        subprocess.run(["pg_createcluster", version, name, "-p", str(port), "--", "--auth=trust"], check=True,
                       capture_output=True)
        conf = Path(f"/etc/postgresql/{version}/{name}/postgresql.conf")
        conf.write_text(conf.read_text() + "listen_addresses = '127.0.0.1'\nfsync = off\n")
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, name, "start"], check=True,
                       capture_output=True)
        cluster = PitrCluster(name, base, data_dir, port, Path(f"/usr/lib/postgresql/{version}/bin"),
                              base / "runbooks.toml")
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE app")
        cluster.config.write_text(
            f'[stores.pitrlocal]\nkind = "local"\npath = "{base / "repo"}"\n'
            f'[databases.{name}]\ndsn = "{cluster.dsn}"\nstore = "pitrlocal"\n'
            f'[databases.{name}.pitr]\ndata_dir = "{data_dir}"\nport = {port}\ncontrol = "pg_ctlcluster"\n'
            f'cluster = "{version}/{name}"\nconfig_file = "{base / "pgbackrest.conf"}"\nlog_dir = "{base / "log"}"\n'
            f'archive_timeout = 2\nrecovery_timeout_seconds = 120\nrepos = [{{ store = "pitrlocal" }}]\n')
        monkeypatch.setenv("RUNBOOKS_CONFIG", str(cluster.config))
        yield cluster
    finally:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, name, "stop", "-m", "immediate"],
                       capture_output=True)
        subprocess.run(["pg_dropcluster", version, name], capture_output=True)
        for left in glob.glob(f"/var/lib/postgresql/{version}/{name}.*"):
            subprocess.run(["runuser", "-u", "postgres", "--", f"/usr/lib/postgresql/{version}/bin/pg_ctl", "stop",
                            "-m", "immediate", "-D", left], capture_output=True)
            shutil.rmtree(left, ignore_errors=True) if os.path.isdir(left) else os.unlink(left)
        shutil.rmtree(base, ignore_errors=True)


def test_a_debian_cluster_is_set_up_restored_beside_itself_and_switched(debian_cluster):
    cluster = debian_cluster
    settings = load_settings()
    stanza = settings.stanza(cluster.name)
    done = pitr.setup(stanza, settings.database(cluster.name).dsn, cluster.bin_dir, restart=True)
    assert "restarted the cluster" in done  # through pg_ctlcluster
    assert not (cluster.data_dir / "postgresql.conf").exists()  # Debian keeps it in /etc
    pitr.backup(stanza, "full", 1)
    cluster.sql("CREATE TABLE t (id int, note text)")
    target = writes_around_a_target(cluster)

    side = pitr_restore(cluster.name, target_time=target.isoformat())
    try:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{side.port}/app") as conn:
            assert conn.execute("SELECT id, note FROM t").fetchall() == [(1, "before")]
    finally:
        cluster.pg_ctl("stop", "-m", "fast", data_dir=Path(side.data_dir))
        shutil.rmtree(side.data_dir)

    switched = pitr_restore(cluster.name, switch=True, auto_approve=True)
    assert switched.switched and Path(switched.previous_data_dir).is_dir()
    assert cluster.sql("SELECT id FROM t ORDER BY id") == [(1,), (2,)]
    assert not (cluster.data_dir / "postgresql.conf").exists()  # the restored copy's own conf is gone
    status = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True).stdout
    assert any(cluster.name in ln and "online" in ln for ln in status.splitlines()), status
    cluster.sql("INSERT INTO t VALUES (3, 'after the switch')")
    flush_archive(cluster)
