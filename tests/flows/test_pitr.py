"""Point-in-time recovery against a real cluster archiving through pgBackRest: backups,
restore to a second, the guards, a missing WAL segment, the weekly restore test, the
switch, the RPO drill and an archive that fails."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from flows.pitr_backup import pitr_backup, pitr_verify
from flows.pitr_drill import pitr_drill
from flows.pitr_restore import pitr_restore
from flows.pitr_restore_test import pitr_restore_test
from tasks import pitr, pitr_switch
from tasks.config import load_settings
from tasks.errors import ConfigError, VerificationError
from tests.pitr_cluster import PitrCluster, flush_archive, pitr_cluster
from tests.security_stack import artifact


@pytest.fixture(scope="module")
def cluster() -> Iterator[PitrCluster]:
    with pitr_cluster("pitrdb", extra="drill = true\nverify_query = \"SELECT count(*) > 0 FROM orders\"\n") as c:
        c.sql("CREATE TABLE orders (id int PRIMARY KEY, note text, at timestamptz DEFAULT clock_timestamp())")
        c.sql("INSERT INTO orders SELECT g, 'seed' FROM generate_series(1, 1000) g")
        pitr.backup(load_settings().stanza("pitrdb"), "full", 1)  # each test may run alone
        yield c


def stanza() -> pitr.Stanza:
    return load_settings().stanza("pitrdb")


def side_rows(port: int, query: str) -> list[tuple]:
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/app", autocommit=True) as conn:
        return conn.execute(query).fetchall()


def stop_side(cluster: PitrCluster, data_dir: str) -> None:
    cluster.pg_ctl("stop", "-m", "fast", data_dir=Path(data_dir))
    shutil.rmtree(data_dir)
    Path(data_dir + ".log").unlink()


def test_full_diff_and_incr_backups_report_what_they_stored(cluster):
    full = pitr_backup("pitrdb", type="full")
    cluster.sql("INSERT INTO orders SELECT g, 'after full' FROM generate_series(1001, 1100) g")
    diff = pitr_backup("pitrdb", type="diff")
    cluster.sql("INSERT INTO orders SELECT g, 'after diff' FROM generate_series(1101, 1200) g")
    incr = pitr_backup("pitrdb", type="incr")
    assert [r.sets[0].type for r in (full, diff, incr)] == ["full", "diff", "incr"]
    assert diff.sets[0].stored_bytes < full.sets[0].stored_bytes / 5
    assert incr.sets[0].stored_bytes < full.sets[0].stored_bytes / 5
    assert incr.sets[0].wal_segments_since_previous >= 1 and not incr.archive_failing
    labels = [b.label for b in stanza().info(1).usable(1)]
    assert labels[-3:] == [full.sets[0].label, diff.sets[0].label, incr.sets[0].label]


def test_restore_to_a_second_between_two_writes_keeps_exactly_the_writes_before(cluster):
    pitr_backup("pitrdb", type="full")
    cluster.sql("INSERT INTO orders VALUES (5001, 'before the target')")
    time.sleep(0.3)
    target = cluster.sql("SELECT now()")[0][0]
    time.sleep(0.3)
    cluster.sql("INSERT INTO orders VALUES (5002, 'after the target')")
    cluster.sql("DELETE FROM orders WHERE id <= 10")  # the mistake to undo
    flush_archive(cluster)
    newer = pitr_backup("pitrdb", type="incr")  # a set that ended after the target: must not be used

    r = pitr_restore("pitrdb", target_time=target.isoformat())
    try:
        assert r.backup_set != newer.sets[0].label and not r.switched and r.port != cluster.port
        got = dict(side_rows(r.port, "SELECT id, note FROM orders WHERE id >= 5001 OR id <= 10"))
        assert got.get(5001) == "before the target" and 5002 not in got
        assert sorted(i for i in got if i <= 10) == list(range(1, 11))  # the deleted rows are there
        assert r.recovered_to is not None and r.recovered_to <= target
        assert side_rows(r.port, "SELECT pg_is_in_recovery()") == [(True,)]  # paused, read-only
        assert cluster.sql("SELECT count(*) FROM orders WHERE id <= 10") == [(0,)]  # production untouched
    finally:
        stop_side(cluster, r.data_dir)


def test_a_target_after_the_last_commit_in_the_archive_recovers_all_of_it(cluster):
    """PostgreSQL stops at a time only when it sees a commit after it; with none archived
    it would fail "recovery ended before configured recovery target was reached"."""
    cluster.sql("INSERT INTO orders VALUES (5101, 'the last write')")
    target = cluster.sql("SELECT clock_timestamp()")[0][0]
    flush_archive(cluster)  # archived after the target; no transaction after it
    r = pitr_restore("pitrdb", target_time=target.isoformat())
    try:
        assert side_rows(r.port, "SELECT note FROM orders WHERE id = 5101") == [("the last write",)]
        assert r.recovered_to is not None and r.recovered_to <= target
        assert "no transaction after the target in the archive" in artifact("pitr-restore-pitrdb")
    finally:
        stop_side(cluster, r.data_dir)


def test_a_target_outside_the_backups_and_archive_is_refused_naming_both(cluster):
    oldest = stanza().info(1).usable(1)[0]
    with pytest.raises(pitr.TargetOutOfRange, match=rf"before the oldest backup {oldest.label}.*newest archived WAL"):
        pitr_restore("pitrdb", target_time=(oldest.stopped - timedelta(hours=1)).isoformat())
    with pytest.raises(pitr.TargetOutOfRange, match=rf"after the newest archived WAL [0-9A-F]{{24}}.*oldest backup "
                                                    rf"{oldest.label}"):
        pitr_restore("pitrdb", target_time="2099-01-01T00:00:00+00:00")
    with pytest.raises(ConfigError, match="no zone"):
        pitr_restore("pitrdb", target_time="2026-12-07 10:00:00")
    assert not [p for p in cluster.base.glob("data.pitr-*") if p.is_dir()]  # nothing was restored


def test_a_missing_wal_segment_fails_verify_and_a_restore_across_it_is_refused(cluster):
    pitr_backup("pitrdb", type="incr")
    flush_archive(cluster)
    hole = flush_archive(cluster)
    cluster.sql("INSERT INTO orders VALUES (6001, 'after the hole')")
    flush_archive(cluster)
    archived = next((cluster.base / "repo" / "pgbackrest" / "archive" / "pitrdb").glob(f"*/*/{hole}-*"))
    aside = cluster.base / archived.name
    archived.rename(aside)
    try:
        with pytest.raises(VerificationError, match=f"WAL segment {hole} is missing"):
            pitr_verify("pitrdb")
        with pytest.raises(pitr.WalGap, match=f"WAL segment {hole} is missing .* recovery cannot cross it"):
            pitr_restore("pitrdb")
    finally:
        aside.rename(archived)
    assert pitr_verify("pitrdb").backups >= 1


def test_the_weekly_restore_test_marks_the_newest_set_verified_and_leaves_nothing(cluster):
    r = pitr_restore_test("pitrdb")
    newest = stanza().info(1).usable(1)[-1]
    assert r.backup_set == newest.label and newest.verified_at is not None
    assert r.rows >= 1000 and r.time_to_verified_seconds > 0
    assert not list(cluster.base.glob("data.restoretest-*"))  # directory and server log
    assert "| pg_amcheck (after the RTO clock) | app: ok, postgres: ok |" in artifact("pitr-restore-test-pitrdb")


def test_switch_puts_the_restored_cluster_in_production_and_keeps_the_old_data(cluster):
    cluster.sql("INSERT INTO orders VALUES (7001, 'kept by the switch')")
    flush_archive(cluster)
    r = pitr_restore("pitrdb", switch=True, auto_approve=True)
    assert r.switched and r.port == cluster.port and Path(r.previous_data_dir).is_dir()
    assert cluster.sql("SELECT note FROM orders WHERE id = 7001") == [("kept by the switch",)]
    assert cluster.sql("SELECT pg_is_in_recovery()") == [(False,)]
    cluster.sql("INSERT INTO orders VALUES (7002, 'written after the switch')")  # writable, archiving
    flush_archive(cluster)
    assert pitr.archiver_status(cluster.dsn)["failing"] is False
    shutil.rmtree(r.previous_data_dir)


KILLED_SWITCH = """
import os, signal, sys
from pathlib import Path
from deployments.environment import quiet_prefect
quiet_prefect()
from flows.pitr_restore import pitr_restore
from tasks import pitr, pitr_switch

point, rename, control = sys.argv[1], Path.rename, pitr.control

def killing_rename(self, target):  # SIGKILL right after production's directory went aside
    out = rename(self, target)
    if point == "aside" and ".replaced-" in str(target):
        os.kill(os.getpid(), signal.SIGKILL)
    return out

def killing_control(cfg, action, bin_dir):  # SIGKILL with the restored directory in place, not started
    if point == "moved-in" and action == "start":
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "undoing" and action == "start" and not hasattr(pitr, "failed_once"):
        pitr.failed_once = True
        raise pitr.PitrError("injected: production did not start")  # the switch fails and is undone...
    return control(cfg, action, bin_dir)

def killing_stop(*args, **kwargs):  # ...and SIGKILL once the undo has stopped the restored cluster
    stop(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

import flows.pitr_restore as switching
stop = switching.stop_quietly
if point == "undoing":
    switching.stop_quietly = killing_stop
Path.rename, pitr.control = killing_rename, killing_control
pitr_restore("pitrdb", switch=True, auto_approve=True)
"""


def kill_a_switch(cluster: PitrCluster, point: str, tmp_path: Path) -> None:
    """Run a switch in a process of its own, SIGKILL it at `point`, and mark its run
    Crashed as `runbooks serve` or a worker does when a run's process dies (so the next
    run need not wait for the dead holder's heartbeat to go stale)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Crashed

    script = tmp_path / "killed_switch.py"
    script.write_text(KILLED_SWITCH)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.run([sys.executable, str(script), point], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert pitr_switch.read(stanza().cfg) is not None
    with get_client(sync_client=True) as client:
        (dead,) = client.request("POST", "/flow_runs/filter", json={
            "flows": {"name": {"any_": ["pitr-restore"]}}, "flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}},
            "limit": 5, "offset": 0}).json()
        client.set_flow_run_state(dead["id"], Crashed(message="its process was killed"), force=True)


def timeline(cluster: PitrCluster) -> int:
    return cluster.sql("SELECT timeline_id FROM pg_control_checkpoint()")[0][0]


def test_a_switch_killed_with_production_aside_is_put_back_by_the_next_pitr_run(cluster, tmp_path):
    cluster.sql("INSERT INTO orders VALUES (7101, 'before the killed switch')")
    flush_archive(cluster)
    before = timeline(cluster)
    kill_a_switch(cluster, "aside", tmp_path)
    assert not cluster.data_dir.exists()  # production is down, its data aside: the state to settle
    assert "did not finish" in pitr_switch.describe(stanza().cfg)

    pitr_backup("pitrdb", type="incr")  # any PITR run settles it first, under the cluster's slot
    report = artifact("pitr-incr-backup-pitrdb")
    assert "settle a dead run's switch" in report and "put it back from" in report, report
    assert "started production on port" in report
    assert timeline(cluster) == before  # production's own directory, not the restored copy
    assert cluster.sql("SELECT note FROM orders WHERE id = 7101") == [("before the killed switch",)]
    assert pitr_switch.read(stanza().cfg) is None and not list(cluster.base.glob("data.replaced-*"))
    (side,) = [d for d in cluster.base.glob("data.pitr-*") if d.is_dir()]  # the restored copy: kept, stopped
    assert not (side / "postmaster.pid").exists()
    stop_side(cluster, str(side))


def test_a_switch_killed_with_the_restored_cluster_in_place_is_finished_by_recovery_cleanup(cluster, tmp_path):
    from typer.testing import CliRunner

    from deployments.cli import app

    cluster.sql("INSERT INTO orders VALUES (7201, 'before the killed switch')")
    flush_archive(cluster)
    before = timeline(cluster)
    kill_a_switch(cluster, "moved-in", tmp_path)
    assert cluster.data_dir.is_dir() and not (cluster.data_dir / "postmaster.pid").exists()

    result = CliRunner().invoke(app, ["recovery", "cleanup", "--database", "pitrdb", "--yes"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "had moved the restored cluster in: finished it" in result.output, result.output
    assert "started production on port" in result.output
    assert timeline(cluster) > before  # the restored cluster, promoted, is production now
    assert cluster.sql("SELECT note FROM orders WHERE id = 7201") == [("before the killed switch",)]
    assert cluster.sql("SELECT pg_is_in_recovery()") == [(False,)]
    assert pitr_switch.read(stanza().cfg) is None
    (kept,) = cluster.base.glob("data.replaced-*")  # production's old directory, as a switch keeps it
    shutil.rmtree(kept)
    flush_archive(cluster)  # the new timeline archives


def test_a_switch_killed_while_it_was_being_undone_is_undone_not_finished(cluster, tmp_path):
    cluster.sql("INSERT INTO orders VALUES (7301, 'before the failed switch')")
    flush_archive(cluster)
    before = timeline(cluster)
    kill_a_switch(cluster, "undoing", tmp_path)
    assert pitr_switch.read(stanza().cfg).undoing  # killed with the restored directory still in place
    assert cluster.data_dir.is_dir() and list(cluster.base.glob("data.replaced-*"))

    pitr_backup("pitrdb", type="incr")
    report = artifact("pitr-incr-backup-pitrdb")
    assert "was undoing a failed switch: moved the restored cluster back to" in report, report
    assert "had moved production's data directory aside: put it back from" in report
    assert timeline(cluster) == before  # production's own data, not the failed switch's
    assert cluster.sql("SELECT note FROM orders WHERE id = 7301") == [("before the failed switch",)]
    assert pitr_switch.read(stanza().cfg) is None and not list(cluster.base.glob("data.replaced-*"))
    (side,) = [d for d in cluster.base.glob("data.pitr-*") if d.is_dir()]
    stop_side(cluster, str(side))


def test_the_rpo_drill_counts_the_markers_a_crash_loses(cluster):
    r = pitr_drill("pitrdb", write_seconds=4)
    assert r.markers_written >= 3
    kept = cluster.sql("SELECT count(*) FROM runbooks_rpo_markers")[0][0]
    assert r.markers_lost == r.markers_written - kept  # counted, not assumed
    assert r.rpo_seconds <= 2 + 3  # archive_timeout 2 s, plus the push
    assert r.met and r.rto_seconds > 0
    assert not list(cluster.base.glob("data.drill-lost-*"))
    assert cluster.sql("SELECT pg_is_in_recovery()") == [(False,)]


def test_the_drill_refuses_a_cluster_not_marked_for_drills(cluster, monkeypatch, tmp_path):
    text = cluster.config.read_text().replace("drill = true\n", "")
    path = tmp_path / "runbooks.toml"
    path.write_text(text)
    monkeypatch.setenv("RUNBOOKS_CONFIG", str(path))
    with pytest.raises(ConfigError, match="drill = true"):
        pitr_drill("pitrdb", write_seconds=1)
    assert cluster.sql("SELECT 1") == [(1,)]


def exported_metrics() -> dict:
    from deployments.pitr_metrics import PitrHealth

    health = PitrHealth(load_settings())
    health.refresh()
    return {(s.name, tuple(s.labels.values())): s.value for m in health.collect() for s in m.samples}


def test_the_metrics_say_when_the_newest_full_backup_ended_and_that_archiving_works(cluster):
    metrics = exported_metrics()
    newest_full = max(b.stopped for b in stanza().info(1).usable(1) if b.type == "full")
    assert metrics[("runbooks_pitr_last_backup_timestamp_seconds", ("pitrdb", "full", "1"))] == newest_full.timestamp()
    assert metrics[("runbooks_pitr_archive_failing", ("pitrdb",))] == 0
    assert metrics[("runbooks_pitr_rpo_target_seconds", ("pitrdb",))] == 60


def test_an_unreachable_repository_fails_archiving_and_the_backup_but_not_postgres(cluster):
    repo = cluster.base / "repo" / "pgbackrest"
    moved = cluster.base / "repo-unreachable"
    repo.rename(moved)
    try:
        cluster.sql("INSERT INTO orders VALUES (8001, 'while the archive fails')")
        cluster.sql("SELECT pg_switch_wal()")
        deadline = time.monotonic() + 30
        while not pitr.archiver_status(cluster.dsn)["failing"] and time.monotonic() < deadline:
            time.sleep(0.3)
        status = pitr.archiver_status(cluster.dsn)
        assert status["failing"] and status["ready"] >= 1
        metrics = exported_metrics()  # what the receiver's /metrics gives Prometheus: PitrArchiveFailing
        assert metrics[("runbooks_pitr_archive_failing", ("pitrdb",))] == 1
        assert metrics[("runbooks_pitr_archive_lag_seconds", ("pitrdb",))] > 0
        assert metrics[("runbooks_pitr_up", ("pitrdb",))] == 1
        with pytest.raises(pitr.PitrError, match=r"pgbackrest backup \(stanza pitrdb, repo1\) failed: .*"):
            pitr_backup("pitrdb", type="incr")
        assert cluster.sql("SELECT note FROM orders WHERE id = 8001") == [("while the archive fails",)]
    finally:
        moved.rename(repo)
    flush_archive(cluster)  # PostgreSQL retries; the backlog drains
    assert pitr.archiver_status(cluster.dsn)["ready"] == 0
