"""The repository's Prometheus rules and Alertmanager config, checked by the tools that
load them (promtool, amtool) and against what the receiver and the runbooks expect."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tasks.alerts import _SEVERITY
from tests.conftest import need

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"


def tool(name: str) -> str:
    path = shutil.which(name)
    need(path is not None, f"{name} is not installed (Debian: prometheus, prometheus-alertmanager)")
    return str(path)


def check(args: list[str], cwd: Path = MONITORING) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_the_rules_load_and_their_unit_tests_pass():
    assert "SUCCESS: 21 rules found" in check([tool("promtool"), "check", "rules", "rules.yml"])
    assert "SUCCESS" in check([tool("promtool"), "test", "rules", "rules_test.yml"], cwd=MONITORING / "tests")
    assert "SUCCESS" in check([tool("promtool"), "test", "rules", "pitr_rules_test.yml"], cwd=MONITORING / "tests")


def test_the_alertmanager_config_loads_and_posts_to_the_receiver():
    assert "SUCCESS" in check([tool("amtool"), "check-config", "alertmanager.yml"])
    config = yaml.safe_load((MONITORING / "alertmanager.yml").read_text())
    (hook,) = [h for r in config["receivers"] for h in r.get("webhook_configs", [])]
    assert hook["url"].endswith("/alerts") and hook["send_resolved"] is True
    assert hook["http_config"]["authorization"]["type"] == "Bearer"


def test_every_rule_has_a_severity_the_receiver_knows_and_names_real_runbooks():
    flows = {p.stem.replace("_", "-") for p in (MONITORING.parent / "flows").glob("*.py")}
    rules = [r for g in yaml.safe_load((MONITORING / "rules.yml").read_text())["groups"] for r in g["rules"]]
    for rule in rules:
        assert rule["labels"]["severity"] in _SEVERITY, rule["alert"]
        runbook = rule["annotations"].get("runbook")
        assert runbook is None or runbook in flows, (rule["alert"], runbook)


def test_a_broken_rule_is_refused(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: Broken\n        expr: up ==\n")
    proc = subprocess.run([tool("promtool"), "check", "rules", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and '"Broken": could not parse expression' in proc.stdout + proc.stderr


def test_the_burn_rate_rules_are_what_runbooks_slo_rules_writes_and_their_unit_tests_pass(tmp_path, write_config):
    from typer.testing import CliRunner

    from deployments.cli import app

    write_config(f'[services.api]\nbase_url = "http://127.0.0.1:8000"\ncontroller = {{ kind = "process", '
                 f'command = ["true"], pid_file = "{tmp_path}/p", log_file = "{tmp_path}/l" }}\n[slo.api]\n')
    written = tmp_path / "slo-rules.yml"
    result = CliRunner().invoke(app, ["slo", "rules", "--output", str(written)])
    assert result.exit_code == 0, result.output
    assert written.read_text() == (MONITORING / "slo-rules.yml").read_text()  # the committed file is current
    assert "SUCCESS: 9 rules found" in check([tool("promtool"), "check", "rules", "slo-rules.yml"])
    assert "SUCCESS" in check([tool("promtool"), "test", "rules", "slo_rules_test.yml"], cwd=MONITORING / "tests")
    rules = [r for g in yaml.safe_load(written.read_text())["groups"] for r in g["rules"] if "alert" in r]
    assert {r["labels"]["severity"] for r in rules} <= set(_SEVERITY)


def _exported_metrics() -> set[str]:
    """Every metric name something in the project exports (as Prometheus exposes it)."""
    root = MONITORING.parent
    names = {"up"}
    kinds = re.compile(r'(Counter|Gauge|Histogram|GaugeMetricFamily)\(\s*"([a-z_:]+)"')
    for path in [root / "demo" / "service.py", *sorted((root / "deployments").glob("*.py"))]:
        for kind, name in kinds.findall(path.read_text()):
            names |= {name.removesuffix("_total") + "_total"} if kind == "Counter" else \
                {name + s for s in ("_bucket", "_count", "_sum")} if kind == "Histogram" else {name}
    names |= set(re.findall(r"# TYPE (runbooks_[a-z_]+) ", (root / "flows" / "health_check.py").read_text()))
    names |= {r["record"] for g in yaml.safe_load((MONITORING / "slo-rules.yml").read_text())["groups"]
              for r in g["rules"] if "record" in r}
    return names


def test_every_dashboard_query_parses_and_reads_only_metrics_the_project_exports(tmp_path):
    exported = _exported_metrics()
    assert {"fraiseql_http_requests_total", "runbooks_handover_seconds_bucket", "runbooks_probe_success",
            "slo:error_ratio:1h", "runbooks_incidents_open"} <= exported
    rules, used = [], set()
    for path in sorted((MONITORING / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] and dashboard["panels"], path.name
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", "5m").replace("$job", "api")
                rules.append({"record": f"dashboard:{path.stem.replace('-', '_')}:{panel['id']}{target['refId']}",
                              "expr": expr})
                used |= set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))
    assert len(rules) >= 20
    (tmp_path / "dashboards.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in check([tool("promtool"), "check", "rules", "dashboards.yml"],
                                                        cwd=tmp_path)
    assert used and used <= exported, sorted(used - exported)
