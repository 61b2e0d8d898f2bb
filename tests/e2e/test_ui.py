"""The Prefect UI served by `runbooks serve`, in a real browser (Debian's chromium driven
by playwright): start a restore test from its form, see it complete, read its report.
Screenshots go to test-output/ui/."""

from __future__ import annotations

import re

from tests.e2e.conftest import (BIN, SHOTS, api_client, choose, custom_run_form, deployments_by_name, run,
                                submit_form, wait_final, wait_for, wait_for_approval, submit_dialog)


def test_restore_test_started_from_its_form_completes_with_its_report(served, page):
    backup = run([str(BIN / "runbooks"), "run", "backup-orders", "--watch"], served["env"])
    assert backup.returncode == 0, backup.stdout + backup.stderr
    backup_id = re.search(r"Backup id: (\S+)", backup.stdout).group(1)

    custom_run_form(page, served, "restore-test-orders")
    page.get_by_text("The database target whose backup is tested").wait_for()
    page.get_by_text("One backup to test").wait_for()
    assert page.get_by_text("orders", exact=True).count() >= 1  # the dropdown shows the configured target
    assert page.get_by_role("button", name="str").count() == 0, "an optional field renders as a type switch"
    page.locator("textarea").first.fill(backup_id)  # backup_id: this very backup, not just the newest
    page.screenshot(path=str(SHOTS / "1-restore-test-form.png"), full_page=True)

    with api_client(served["url"]) as client:
        before = {r["id"] for r in _runs(client, "restore-test-orders")}
    try:
        submit_form(page)
    finally:
        page.screenshot(path=str(SHOTS / "1b-after-submit.png"), full_page=True)
    with api_client(served["url"]) as client:
        new = wait_for(lambda: [r for r in _runs(client, "restore-test-orders")
                                if r["id"] not in before and not r["auto_scheduled"]],
                       30, "the run the form created")
        final = wait_final(client, new[0]["id"], timeout=120)
    assert final["state_type"] == "COMPLETED", final["state"]
    assert {k: final["parameters"].get(k) for k in ("database", "backup_id", "dry_run")} == \
        {"database": "orders", "backup_id": backup_id, "dry_run": False}

    page.goto(f"{served['ui']}/runs/flow-run/{final['id']}")
    page.get_by_text("Completed").first.wait_for()
    page.screenshot(path=str(SHOTS / "2-restore-test-run.png"), full_page=True)
    page.get_by_text("Artifacts", exact=True).click()
    page.get_by_text("Restore test of orders: passed").click()  # the report card
    page.screenshot(path=str(SHOTS / "3a-artifacts.png"), full_page=True)
    page.get_by_text("Time to verified (measured RTO)").wait_for()
    assert page.get_by_text(backup_id).count() >= 1  # the report names the backup the form chose
    assert page.get_by_text("Outcome:").count() >= 1
    page.screenshot(path=str(SHOTS / "3-restore-test-report.png"), full_page=True)


def test_the_retention_form_asks_before_it_deletes(served, page):
    custom_run_form(page, served, "backup-retention")
    page.get_by_text("Delete without asking").wait_for()
    switches = page.get_by_role("switch")
    states = [switches.nth(i).is_checked() for i in range(switches.count())]
    assert states and not any(states), f"a switch opens on: {states}"
    page.screenshot(path=str(SHOTS / "4-retention-form.png"), full_page=True)


def test_a_recovery_is_approved_in_its_resume_form(served, page):
    """The approval gate as a person meets it: the paused run's Resume form shows the
    evidence; approve, name and reason are given in the browser; the run swaps and its
    report names the approver."""
    for deployment in ("backup-orders", "restore-test-orders"):  # a verified backup to recover from
        done = run([str(BIN / "runbooks"), "run", deployment, "--watch"], served["env"])
        assert done.returncode == 0, done.stdout + done.stderr
    with api_client(served["url"]) as client:
        dep = deployments_by_name(client)["database-recovery-orders"]
        created = client.post(f"/deployments/{dep['id']}/create_flow_run",
                              json={"parameters": {"incident": "INC-UI"}})
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        wait_for_approval(client, run_id, 120, "the recovery to wait for approval")

    page.goto(f"{served['ui']}/runs/flow-run/{run_id}")
    page.get_by_role("button", name="Resume").click()
    form = page.get_by_role("dialog")
    form.get_by_text("Approve: swap").wait_for()  # the evidence is in the form
    form.get_by_text("Data-loss window").wait_for()
    form.get_by_text("Your name; an approval without one is declined.").wait_for()
    page.screenshot(path=str(SHOTS / "5-approval-form.png"), full_page=True)
    form.get_by_role("switch").first.click()
    form.locator("textarea").nth(0).fill("ann")  # approver
    form.locator("textarea").nth(1).fill("INC-UI: checked the assessment")  # reason
    page.screenshot(path=str(SHOTS / "5b-approval-filled.png"), full_page=True)
    submit_dialog(form)

    with api_client(served["url"]) as client:
        final = wait_final(client, run_id, timeout=180)
    assert final["state_type"] == "COMPLETED", final["state"]
    page.goto(f"{served['ui']}/runs/flow-run/{run_id}")
    page.get_by_text("Artifacts", exact=True).click()
    page.get_by_text("Database recovery of orders: recovered").click()
    page.get_by_text("approved by ann: INC-UI: checked the assessment").wait_for()
    page.screenshot(path=str(SHOTS / "6-recovery-report.png"), full_page=True)


def test_an_incident_declared_from_its_form_is_acknowledged_and_resolved_from_a_terminal(served, page):
    """A person declares an incident no alert caught in the UI's form (title, severity),
    acknowledges and resolves it with `runbooks incident`, and reads its report."""
    title = "Checkout fails for EU customers (declared in the UI)"
    custom_run_form(page, served, "incident-response")
    page.get_by_text("What is wrong, in a line").wait_for()
    page.locator("textarea").first.fill(title)
    choose(page, 0, "HIGH")  # severity
    page.screenshot(path=str(SHOTS / "7-incident-form.png"), full_page=True)
    submit_form(page)

    listed = wait_for(lambda: (r := run([str(BIN / "runbooks"), "incident", "list"], served["env"])).returncode == 0
                      and title[:20] in r.stdout and r, 90, "the incident to be declared")
    line = next(x for x in listed.stdout.splitlines() if title[:20] in x)
    incident_id = next(w for w in line.replace("│", " ").split() if w.startswith("INC-"))
    assert " HIGH " in line and " open " in line
    for args in (["ack", incident_id, "--by", "ann"], ["resolve", incident_id, "--by", "ann", "--note", "rolled back"]):
        done = run([str(BIN / "runbooks"), "incident", *args], served["env"])
        assert done.returncode == 0, done.stdout + done.stderr
    with api_client(served["url"]) as client:
        (incident,) = [r for r in _runs(client, "incident-response") if r["parameters"].get("title") == title]
        final = wait_final(client, incident["id"], timeout=120)
    assert final["state_type"] == "COMPLETED", final["state"]
    page.goto(f"{served['ui']}/runs/flow-run/{final['id']}")
    page.get_by_text("Artifacts", exact=True).click()
    page.get_by_text(f"Post-incident report of {incident_id}").click()
    page.get_by_text(f"Incident Report: {incident_id}").wait_for()
    page.get_by_text("resolved by ann: rolled back").first.wait_for()
    assert page.get_by_text("acknowledged by ann via cli").count() >= 1  # in the timeline
    page.screenshot(path=str(SHOTS / "8-incident-report.png"), full_page=True)


def _runs(client, deployment: str) -> list[dict]:
    dep = deployments_by_name(client)[deployment]
    return client.post("/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [dep["id"]]}},
                                                 "sort": "EXPECTED_START_TIME_DESC"}).json()
