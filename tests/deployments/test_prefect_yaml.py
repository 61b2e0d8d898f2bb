"""prefect.yaml: every deployment loads, has the agreed schedule and a usable form."""

from __future__ import annotations

from deployments.serve import load_deployments


def _props(d) -> dict:
    return d._parameter_openapi_schema.model_dump()["properties"]


def test_every_deployment_builds_with_valid_parameters():
    deployments = {d.name: d for d in load_deployments()}
    assert set(deployments) == {"backup-orders", "restore-test-orders", "backup-retention", "health-check",
                                "service-restart-api"}
    for d in deployments.values():
        props = _props(d)
        for name in d.parameters:
            assert name in props, f"{d.name}: parameter {name} is not in the flow's signature"
        assert all("type" in p or "anyOf" in p for p in props.values()), d.name


def test_schedules_are_the_agreed_ones():
    deployments = {d.name: d for d in load_deployments()}
    crons = {name: [s.schedule.cron for s in d.schedules] for name, d in deployments.items()}
    assert crons == {"backup-orders": ["0 0,6,12,18 * * *"], "restore-test-orders": ["0 3 * * 0"],
                     "backup-retention": ["30 4 * * *"], "health-check": ["* * * * *"],
                     "service-restart-api": []}
    for d in deployments.values():
        assert all(s.schedule.timezone == "UTC" for s in d.schedules)
        assert d.concurrency_limit == 1


def test_backup_form_is_small_and_typed():
    props = _props({d.name: d for d in load_deployments()}["backup-orders"])
    assert set(props) == {"database", "dry_run"}
    assert props["database"]["type"] == "string"
    assert props["dry_run"]["type"] == "boolean" and props["dry_run"]["default"] is False


def test_health_check_deployment_writes_the_metrics_file():
    d = {d.name: d for d in load_deployments()}["health-check"]
    assert d.parameters == {"metrics_file": "metrics/runbooks.prom"}
