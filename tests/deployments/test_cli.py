"""The `runbooks` command: config check, backups list/show, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
from typer.testing import CliRunner

from deployments.cli import app
from flows.backup_database import backup_database
from tests.conftest import free_port
from tests.flows.test_backup_and_restore import local_config

runner = CliRunner()


def test_config_check_one_line_per_target(sample_db, tmp_path, write_config):
    write_config(local_config(sample_db, tmp_path / "store") + f"""
[databases.broken]
dsn = "postgresql://app:t0p-secret@127.0.0.1:{free_port()}/nowhere"
store = "primary"
connect_timeout = 2
""")
    result = runner.invoke(app, ["config", "check"])
    lines = result.output.splitlines()
    assert result.exit_code == 1, result.output
    assert not result.exception or isinstance(result.exception, SystemExit), repr(result.exception)
    assert any(ln.startswith("database orders: ok (PostgreSQL") for ln in lines), result.output
    assert any(ln.startswith("database broken: FAILED") and "refused" in ln for ln in lines)
    assert any(ln.startswith("store primary: ok") for ln in lines)
    assert "t0p-secret" not in result.output


def test_backups_list_and_show(sample_db, tmp_path, write_config):
    write_config(local_config(sample_db, tmp_path / "store"))
    bid = backup_database("orders").backup_id
    listed = runner.invoke(app, ["backups", "list"])
    assert listed.exit_code == 0 and bid in listed.output and "not yet" in listed.output
    shown = runner.invoke(app, ["backups", "show", bid])
    assert shown.exit_code == 0 and "sha256" in shown.output and "public.orders=" in shown.output


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deployments.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def test_errors_are_one_line_without_traceback(sample_db, tmp_path, write_config):
    path = write_config(local_config(sample_db, tmp_path / "store"))
    env = {"RUNBOOKS_CONFIG": str(path)}
    for args, expected in [(("backups", "show", "../../etc/passwd"), "is not a backup id"),
                           (("restore-test", "orders", "--backup-id", ""), "'' is not a backup id"),
                           (("retention", "--database", ""), "unknown database ''"),
                           (("restart", ""), "unknown service ''"),
                           (("backup", "ordrs"), "unknown database 'ordrs' (known: orders)"),
                           (("backups", "show", "orders-20260101T000000Z-abcd"), "no backup")]:
        proc = _cli(*args, env=env)
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
        assert len(proc.stderr.strip().splitlines()) == 1


def test_a_failed_run_prints_no_traceback(sample_db, tmp_path, write_config):
    path = write_config(local_config(sample_db, tmp_path / "store"))
    proc = _cli("restore-test", "orders", env={"RUNBOOKS_CONFIG": str(path)})
    assert proc.returncode == 2  # an operator error inside the run: exit 2, like one before it
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == \
        f"error: no backups of database 'orders' in store 'primary' ({tmp_path / 'store'})"
    assert "Starting temporary server" not in proc.stderr


def test_restart_names_an_unknown_service(sample_db, tmp_path, write_config):
    path = write_config(local_config(sample_db, tmp_path / "store"))
    proc = _cli("restart", "api", env={"RUNBOOKS_CONFIG": str(path)})
    assert proc.returncode == 2 and "unknown service 'api' (known: none configured)" in proc.stderr


def test_config_check_tries_services_and_prometheus(sample_db, tmp_path, write_config, prometheus, monkeypatch):
    """A running service (its probes, its error rate from a real Prometheus), a stopped one,
    and one whose controller's tool is missing: one line each, exit 1."""
    from tasks.config import load_settings
    from tasks.probes import wait_until_ready
    from tasks.prometheus import MetricsUnavailable

    port = free_port()
    prom_url = prometheus({"api": f"127.0.0.1:{port}"})
    cmd = ", ".join(f'"{a}"' for a in [sys.executable, "-m", "demo.service", "--dsn", sample_db,
                                       "--port", str(port), "--redis", "none"])
    write_config(f"""
[prometheus]
url = "{prom_url}"
[services.api]
base_url = "http://127.0.0.1:{port}"
controller = {{ kind = "process", command = [{cmd}], pid_file = "{tmp_path}/api.pid", log_file = "{tmp_path}/api.log" }}
[services.down]
base_url = "http://127.0.0.1:{free_port()}"
probe_timeout = 1
controller = {{ kind = "process", command = ["true"], pid_file = "{tmp_path}/down.pid", log_file = "{tmp_path}/down.log" }}
[services.web]
base_url = "http://127.0.0.1:{free_port()}"
controller = {{ kind = "systemd", unit = "web.service" }}
[services.busy]
base_url = "http://127.0.0.1:{port}"
prometheus_job = "api"
error_rate_query = 'vector(0.5)'
controller = {{ kind = "process", command = ["true"], pid_file = "{tmp_path}/busy.pid", log_file = "{tmp_path}/busy.log" }}
""")
    settings = load_settings()
    api = settings.controller("api")
    api.start()
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", deadline_seconds=20, interval=0.2)
        errors = settings.error_rate("api")
        for _ in range(100):  # until Prometheus has seen requests to take a rate from
            httpx.get(f"http://127.0.0.1:{port}/health")
            try:
                if errors.read() is not None:
                    break
            except MetricsUnavailable:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("Prometheus never had a rate for the api service")
        (tmp_path / "bin").mkdir()
        monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no systemctl
        result = runner.invoke(app, ["config", "check"])
    finally:
        api.stop()
    lines = result.output.splitlines()
    assert result.exit_code == 1, result.output
    assert f"prometheus: ok ({prom_url})" in lines
    assert any(ln.startswith("service api: ok (pid ") and "error rate 0.00% (threshold 0.10%)" in ln
               for ln in lines), result.output
    down = next(ln for ln in lines if ln.startswith("service down: "))
    assert down.startswith("service down: UNHEALTHY /health: cannot connect") and down.endswith("(not running)")
    assert 'error rate unknown: the query \'(sum(rate(fraiseql_http_requests_total{job="down"' in down
    assert "service web: FAILED service 'web': systemctl not found on this machine (its controller needs it)" \
        in lines
    assert "service busy: UNHEALTHY error rate over its threshold (not running; error rate 50.00% " \
        "(threshold 0.10%))" in lines


def test_config_check_with_prometheus_down_does_not_blame_the_services(tmp_path, write_config):
    gone = f"http://127.0.0.1:{free_port()}"
    write_config(f"""
[prometheus]
url = "{gone}"
[services.down]
base_url = "http://127.0.0.1:{free_port()}"
probe_timeout = 1
controller = {{ kind = "process", command = ["true"], pid_file = "{tmp_path}/down.pid", log_file = "{tmp_path}/down.log" }}
""")
    result = runner.invoke(app, ["config", "check"])
    lines = result.output.splitlines()
    assert result.exit_code == 1, result.output
    assert any(ln.startswith(f"prometheus: FAILED Prometheus at {gone} is unreachable") for ln in lines)
    down = next(ln for ln in lines if ln.startswith("service down: "))
    assert down.endswith("(not running; error rate not read (Prometheus failed))") and "query" not in down
