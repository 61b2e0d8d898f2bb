"""The `runbooks` command: config check, backups list/show, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

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
