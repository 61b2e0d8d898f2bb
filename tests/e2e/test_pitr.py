"""Point-in-time recovery run the way users run it: `runbooks serve` over a config whose
`orders` database is a real cluster archiving through pgBackRest. Its schedules fire on
serve, `runbooks pitr restore` restores beside production through the server, and the UI
form starts a switch that waits for its approval in the browser. (The drill's own
entry point, `runbooks run`, is the one every deployment shares; the drill itself is
tests/flows/test_pitr.py's.)"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tasks import pitr
from tasks.config import load_settings
from tests.conftest import free_port
from tests.e2e.conftest import (BIN, NAMES, SHOTS, api_client, base_env, custom_run_form, deployments_by_name, run, spawn,
                                submit_form, wait_final, wait_for, wait_for_approval, submit_dialog)
from tests.pitr_cluster import PitrCluster, flush_archive, pitr_cluster

PITR_SCHEDULED = {"pitr-backup-full-orders", "pitr-backup-diff-orders", "pitr-backup-incr-orders",
                  "pitr-verify-orders", "pitr-restore-test-orders"}


@pytest.fixture(scope="module")
def pitr_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("pitr-e2e")
    with pitr_cluster("orders") as cluster:
        cluster.sql("CREATE TABLE orders (id int PRIMARY KEY, note text)")
        cluster.sql("INSERT INTO orders SELECT g, 'seed' FROM generate_series(1, 200) g")
        pitr.backup(load_settings().stanza("orders"), "full", 1)
        port = free_port()
        # The scheduler looks for due runs every 5 s instead of every 60 s: the schedule
        # test waits for a firing, not for the loop.
        env = {**base_env(root / "home", cluster.config), "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}
        proc = spawn([str(BIN / "runbooks"), "serve", "--port", str(port)], env, root / "serve.log", cwd=root)
        url = f"http://127.0.0.1:{port}/api"
        try:
            wait_for(lambda: "Serving " in proc.output() or proc.popen.poll() is not None, 120, "runbooks serve")
            assert proc.popen.poll() is None, proc.output()

            def registered() -> bool:
                with api_client(url, timeout=10) as client:
                    return set(deployments_by_name(client)) >= NAMES

            wait_for(registered, 60, "runbooks serve to register the deployments")
            yield {"cluster": cluster, "url": url, "ui": f"http://127.0.0.1:{port}", "proc": proc,
                   "env": {**env, "PREFECT_API_URL": url}}
        finally:
            assert proc.stop() == 0, proc.output()[-3000:]
        out = proc.output()
        assert "Traceback" not in out and "Schedules inactive" not in out, out[-3000:]


def test_the_pitr_schedules_are_active_and_a_schedule_fires_a_backup(pitr_served):
    cluster: PitrCluster = pitr_served["cluster"]
    before = {b.label for b in load_settings().stanza("orders").info(1).backups}
    with api_client(pitr_served["url"]) as client:
        deployments = deployments_by_name(client)
        for name in PITR_SCHEDULED:  # the database has a [pitr] section: the schedules are live
            assert [s["active"] for s in deployments[name]["schedules"]] == [True], name
        incr = deployments["pitr-backup-incr-orders"]
        added = client.post(f"/deployments/{incr['id']}/schedules",
                            json=[{"schedule": {"interval": 5}, "active": True}])
        assert added.status_code == 201, added.text

        def fired() -> list[dict[str, Any]]:
            runs = client.post("/flow_runs/filter", json={"flow_runs": {
                "deployment_id": {"any_": [incr["id"]]}, "state": {"type": {"any_": ["COMPLETED", "FAILED"]}}}}).json()
            return [r for r in runs if r["auto_scheduled"]]

        try:
            runs = wait_for(fired, 150, "a scheduled pitr-backup run to finish", every=2)
        finally:
            client.delete(f"/deployments/{incr['id']}/schedules/{added.json()[0]['id']}")
    assert runs[0]["state_type"] == "COMPLETED", runs[0]["state"]
    made = [b for b in load_settings().stanza("orders").info(1).backups if b.label not in before]
    assert made and made[0].type == "incr"
    assert cluster.sql("SELECT count(*) FROM orders") == [(200,)]


def test_runbooks_pitr_restore_puts_a_point_in_time_beside_production(pitr_served):
    cluster: PitrCluster = pitr_served["cluster"]
    cluster.sql("INSERT INTO orders VALUES (9001, 'before')")
    time.sleep(0.3)
    target = cluster.sql("SELECT now()")[0][0]
    time.sleep(0.3)
    cluster.sql("UPDATE orders SET note = 'overwritten by mistake'")
    flush_archive(cluster)
    done = run([str(BIN / "runbooks"), "pitr", "restore", "orders", "--time", target.isoformat()],
               pitr_served["env"], timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "side cluster: port" in done.stdout and "Traceback" not in done.stderr
    port = int(done.stdout.split("side cluster: port ")[1].split(",")[0])
    data_dir = done.stdout.split("data directory ")[1].split()[0]
    try:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/app") as conn:
            notes = dict(conn.execute("SELECT id, note FROM orders WHERE id IN (1, 9001)").fetchall())
        assert notes == {1: "seed", 9001: "before"}
        assert cluster.sql("SELECT DISTINCT note FROM orders") == [("overwritten by mistake",)]
    finally:
        cluster.pg_ctl("stop", "-m", "fast", data_dir=Path(data_dir))
        shutil.rmtree(data_dir)

    refused = run([str(BIN / "runbooks"), "pitr", "restore", "orders", "--time", "2001-01-01T00:00:00Z"],
                  pitr_served["env"], timeout=120)
    assert refused.returncode == 2 and "error: target 2001-01-01 00:00:00 UTC is before the oldest backup" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_switch_started_from_the_ui_form_waits_for_approval_in_the_browser(pitr_served, page):
    cluster: PitrCluster = pitr_served["cluster"]
    cluster.sql("INSERT INTO orders VALUES (9100, 'latest write')")
    flush_archive(cluster)
    custom_run_form(page, pitr_served, "pitr-restore-orders")
    page.get_by_text("Replace production with the restored cluster (after approval).").wait_for()
    page.get_by_text("Recover to this second, with its zone").wait_for()
    switch = page.get_by_role("switch").nth(1)  # promote, switch, auto_approve
    switch.click()
    page.screenshot(path=str(SHOTS / "pitr-1-restore-form.png"), full_page=True)
    submit_form(page)
    with api_client(pitr_served["url"]) as client:
        dep = deployments_by_name(client)["pitr-restore-orders"]
        runs = wait_for(lambda: client.post("/flow_runs/filter", json={"flow_runs": {
            "deployment_id": {"any_": [dep["id"]]}, "state": {"type": {"any_": ["PAUSED"]}}}}).json(),
            180, "the switch to wait for approval")
        run_id = runs[0]["id"]
        assert runs[0]["parameters"]["switch"] is True
        wait_for_approval(client, run_id, 30, "the approval form to be stored")
    page.goto(f"{pitr_served['ui']}/runs/flow-run/{run_id}")
    page.get_by_role("button", name="Resume").click()
    form = page.get_by_role("dialog")
    form.get_by_text("Approve: switch orders").wait_for()
    form.get_by_text("Rows verified").wait_for()  # the evidence
    form.get_by_role("switch").first.click()
    form.locator("textarea").nth(0).fill("ann")
    form.locator("textarea").nth(1).fill("disk lost; restored to the latest WAL")
    page.screenshot(path=str(SHOTS / "pitr-2-approval.png"), full_page=True)
    submit_dialog(form)
    with api_client(pitr_served["url"]) as client:
        final = wait_final(client, run_id, timeout=180)
    assert final["state_type"] == "COMPLETED", final["state"]
    assert cluster.sql("SELECT note FROM orders WHERE id = 9100") == [("latest write",)]
    assert cluster.sql("SELECT pg_is_in_recovery()") == [(False,)]
    kept = list(cluster.base.glob("data.replaced-*"))
    assert len(kept) == 1
    page.goto(f"{pitr_served['ui']}/runs/flow-run/{run_id}")
    page.get_by_text("Artifacts", exact=True).click()
    page.get_by_text("PITR restore of orders: switched").click()
    page.get_by_text("approved by ann: disk lost; restored to the latest WAL").wait_for()
    page.screenshot(path=str(SHOTS / "pitr-3-report.png"), full_page=True)
    shutil.rmtree(kept[0])

