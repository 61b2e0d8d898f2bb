"""prefect.yaml: every deployment builds with the agreed settings and a form a person can
use; a bad entry is refused naming the deployment and the reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from deployments.spec import PREFECT_YAML, build_deployments, read_specs
from deployments.steps import set_project_directory
from tasks.errors import ConfigError

TARGETS = {"databases": ["orders", "billing"], "services": ["api"], "stores": ["local"]}
KINDS = {"schedule", "runbook", "dr-scenario"}


def _deployments(targets=TARGETS) -> dict:
    return {d.name: d for d in build_deployments(read_specs(), targets)}


def _props(d) -> dict:
    return d._parameter_openapi_schema.model_dump()["properties"]


def test_schedules_limits_and_tags_are_the_agreed_ones():
    deployments = _deployments()
    recoveries = {"database-recovery-orders", "data-loss-orders", "database-corruption-orders"}
    security = {"api-key-revocation", "rate-limit-adjustment", "rate-limit-revert", "ddos-response"}
    pitr_scheduled = {"pitr-backup-full-orders": ("0 1 * * 0", {"type": "full"}),
                      "pitr-backup-diff-orders": ("0 1 * * 1-6", {"type": "diff"}),
                      "pitr-backup-incr-orders": ("30 * * * *", {"type": "incr"}),
                      "pitr-verify-orders": ("0 5 * * *", {}), "pitr-restore-test-orders": ("0 3 * * 6", {})}
    pitr_manual = {"pitr-restore-orders", "pitr-drill-orders"}
    assert set(deployments) == {"backup-orders", "restore-test-orders", "backup-retention", "health-check",
                                "service-restart-api", "incident-response", "slo-report-api"} | recoveries | security \
        | set(pitr_scheduled) | pitr_manual
    with_pitr = {name: d for name, d in _deployments({**TARGETS, "pitr": ["orders"]}).items() if name in pitr_scheduled}
    for name, (cron, params) in pitr_scheduled.items():  # inactive while orders has no [pitr] section
        d = deployments.pop(name)
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in d.schedules] == [(cron, "UTC", False)]
        assert [(s.schedule.cron, s.active) for s in with_pitr[name].schedules] == [(cron, True)]
        assert d.parameters == {"database": "orders", **params} and d.concurrency_limit == 1
        assert {"schedule", "pitr"} <= set(d.tags)
    for name in pitr_manual:
        d = deployments.pop(name)
        assert not d.schedules and d.concurrency_limit is None and {"runbook", "dr-scenario", "pitr"} <= set(d.tags)
    for name in security:  # each holds the slot of the key or limit it changes, not of the deployment
        d = deployments.pop(name)
        assert d.concurrency_limit is None and not d.schedules and {"runbook", "security"} <= set(d.tags)
    for name in recoveries:  # a second recovery is refused by the flow itself, naming the first
        d = deployments.pop(name)
        assert d.concurrency_limit is None and not d.schedules and {"runbook", "dr-scenario"} <= set(d.tags)
    incident = deployments.pop("incident-response")  # every alert is an incident: never one at a time
    assert incident.concurrency_limit is None and not incident.schedules and {"runbook", "incident"} <= set(incident.tags)
    crons = {name: [s.schedule.cron for s in d.schedules] for name, d in deployments.items()}
    assert crons == {"backup-orders": ["0 0,6,12,18 * * *"], "restore-test-orders": ["0 3 * * 0"],
                     "backup-retention": ["30 4 * * *"], "health-check": ["* * * * *"],
                     "service-restart-api": [], "slo-report-api": ["0 6 1 * *"]}
    strategies = {n: d.concurrency_options.collision_strategy.value for n, d in deployments.items()}
    assert strategies == {"backup-orders": "ENQUEUE", "restore-test-orders": "ENQUEUE",
                          "backup-retention": "ENQUEUE", "health-check": "CANCEL_NEW",
                          "service-restart-api": "ENQUEUE", "slo-report-api": "ENQUEUE"}
    for d in deployments.values():
        assert d.concurrency_limit == 1 and d.paused is False
        assert all(s.schedule.timezone == "UTC" and s.active for s in d.schedules)
        assert KINDS & set(d.tags), f"{d.name} has no kind tag: {d.tags}"
        assert ("schedule" in d.tags) == bool(d.schedules), d.name


def test_forms_describe_every_parameter_and_offer_the_configured_targets():
    for d in _deployments().values():
        for name, prop in _props(d).items():
            assert prop.get("description"), f"{d.name}: parameter {name} has no description"
            assert "anyOf" not in prop, f"{d.name}: {name} renders as a type switch"
            assert "type" in prop or "$ref" in prop, f"{d.name}: {name}"  # a $ref: a nested form or a dropdown
    props = _props(_deployments()["restore-test-orders"])
    assert props["database"]["enum"] == ["billing", "orders"]
    assert props["backup_id"]["type"] == "string" and "default" not in props["backup_id"]
    assert _props(_deployments()["service-restart-api"])["service"]["enum"] == ["api"]
    assert _props(_deployments()["service-restart-api"])["watch_seconds"]["type"] == "number"
    recovery = _props(_deployments()["database-recovery-orders"])
    assert recovery["restore_point"]["format"] == "date-time" and "default" not in recovery["restore_point"]
    assert recovery["stop_writes"]["enum"] == ["at_swap", "before_restore"]
    assert recovery["stop_writes"]["default"] == "at_swap"
    assert _props(_deployments()["database-corruption-orders"])["stop_writes"]["default"] == "before_restore"
    # Without a config there is nothing to choose from: a plain text field.
    assert "enum" not in _props(_deployments({})["backup-orders"])["database"]


def test_the_description_is_the_flows_docstring():
    d = _deployments()["backup-orders"]
    assert d.description.startswith("Back up a PostgreSQL database into its store")


def test_health_check_deployment_writes_the_metrics_file():
    assert _deployments()["health-check"].parameters == {"metrics_file": "metrics/runbooks.prom"}


def test_retention_asks_a_person_but_the_schedule_auto_approves():
    d = _deployments()["backup-retention"]
    assert "auto_approve" not in d.parameters
    assert _props(d)["auto_approve"]["default"] is False
    assert [s.parameters for s in d.schedules] == [{"auto_approve": True}]


def _bad_yaml(tmp_path: Path, change) -> Path:
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    change(spec["deployments"])
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("change, expected", [
    (lambda ds: ds[0].update(entrypoint="flows/nope.py:nope"), "deployment backup-orders: entrypoint 'flows/nope.py:nope': no such file"),
    (lambda ds: ds[0].update(entrypoint="flows/backup_database.py:nope"), "deployment backup-orders: entrypoint 'flows/backup_database.py:nope'"),
    (lambda ds: ds[1]["schedules"][0].update(cron="61 * * * *"), "deployment restore-test-orders: schedule 1"),
    (lambda ds: ds[0]["parameters"].update(databse="orders"), "deployment backup-orders: parameters: unknown parameter 'databse'"),
    (lambda ds: ds[0]["parameters"].update(dry_run="sometimes"), "deployment backup-orders: parameters: parameter 'dry_run': \"sometimes\" is not valid"),
    (lambda ds: ds[2]["schedules"][0]["parameters"].update(auto_aprove=True), "deployment backup-retention: schedule 1 parameters: unknown parameter 'auto_aprove'"),
    (lambda ds: ds[3].update(concurrency_limit={"limit": 1, "collision_strategy": "SOMETIMES"}), "deployment health-check: concurrency_limit"),
    (lambda ds: ds.append(dict(ds[0])), "deployment names used twice: backup-orders"),
    (lambda ds: ds[4].update(triggers=[{"enabled": True}]), "deployment service-restart-api: triggers: not a setting runbooks serve knows"),
])
def test_a_bad_entry_is_refused_naming_it(tmp_path, change, expected):
    path = _bad_yaml(tmp_path, change)
    with pytest.raises(ConfigError) as err:
        build_deployments(read_specs(path), TARGETS)
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_pull_step_needs_runbooks_home(monkeypatch, tmp_path):
    monkeypatch.delenv("RUNBOOKS_HOME", raising=False)
    with pytest.raises(ConfigError, match="RUNBOOKS_HOME is not set"):
        set_project_directory()
    monkeypatch.setenv("RUNBOOKS_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="no prefect.yaml there"):
        set_project_directory()
    monkeypatch.setenv("RUNBOOKS_HOME", str(PREFECT_YAML.parent))
    here = os.getcwd()
    try:
        assert set_project_directory() == {"directory": str(PREFECT_YAML.parent)}
        assert os.getcwd() == str(PREFECT_YAML.parent)
    finally:
        os.chdir(here)
