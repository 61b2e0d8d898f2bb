"""database-recovery on a database with a [pitr] section: a logical backup close enough
before the restore point is used as before; otherwise the cluster is recovered to the
point with pgBackRest, and the report says which path was taken and why."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from flows.backup_database import backup_database
from flows.database_recovery import database_recovery
from flows.restore_test import restore_test
from tasks import pitr
from tasks.config import load_settings
from tests.pitr_cluster import flush_archive, pitr_cluster
from tests.security_stack import artifact


@pytest.fixture(scope="module")
def cluster():
    with pitr_cluster("pitrrec", extra="prefer_logical_within_seconds = 600\n") as c:
        c.sql("CREATE TABLE orders (id int PRIMARY KEY, note text)")
        c.sql("INSERT INTO orders SELECT g, 'seed' FROM generate_series(1, 500) g")
        pitr.backup(load_settings().stanza("pitrrec"), "full", 1)
        backup_database("pitrrec")
        restore_test("pitrrec")  # verified: a candidate for recovery
        yield c


def test_a_logical_backup_close_to_the_point_is_used_and_the_report_says_why(cluster):
    r = database_recovery("pitrrec", dry_run=True)
    assert r.dry_run and r.backup_id and r.backup_id.startswith("pitrrec-")  # the logical path's plan
    assert any("pg_restore" in line or "restore" in line for line in r.plan)
    assert "| Recovery path | logical backup pitrrec-" in artifact("database-recovery-pitrrec")


def test_a_point_far_from_any_logical_backup_is_recovered_with_pitr(cluster, tmp_path, monkeypatch):
    text = cluster.config.read_text().replace("prefer_logical_within_seconds = 600", "prefer_logical_within_seconds = 1")
    (tmp_path / "runbooks.toml").write_text(text)
    monkeypatch.setenv("RUNBOOKS_CONFIG", str(tmp_path / "runbooks.toml"))
    cluster.sql("INSERT INTO orders VALUES (1001, 'before the point')")
    time.sleep(2.1)
    point = datetime.now(timezone.utc)
    time.sleep(0.3)
    cluster.sql("DELETE FROM orders WHERE id <= 100")  # the accident
    flush_archive(cluster)

    plan = database_recovery("pitrrec", restore_point=point, dry_run=True)
    assert plan.dry_run and "recover to" in plan.plan[0] and plan.backup_id is None

    r = database_recovery("pitrrec", restore_point=point, auto_approve=True, incident="INC-PITR-1")
    assert r.recovered and r.outcome == "recovered (point-in-time)"
    assert cluster.sql("SELECT count(*) FROM orders WHERE id <= 100") == [(100,)]
    assert cluster.sql("SELECT note FROM orders WHERE id = 1001") == [("before the point",)]
    assert Path(r.pre_restore_database).is_dir()  # production's old data directory, kept
    assert 0 <= r.data_loss_window_seconds < 5 and r.rto_seconds > 0
    report = artifact("database-recovery-pitrrec")
    assert "| Recovery path | point-in-time (pgBackRest): the newest verified logical backup" in report
    assert "replaying WAL loses less" in report and "| switch production |" in report
