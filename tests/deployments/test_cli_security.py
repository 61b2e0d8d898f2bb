"""`runbooks config check`, `api-key` and `rate-limit` against the demo service."""

from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

from deployments.cli import app
from tests.security_stack import call, new_key

runner = CliRunner()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """As a user types it: errors are one line on stderr, exit 2."""
    return subprocess.run([sys.executable, "-m", "deployments.cli", *args], capture_output=True, text=True,
                          timeout=120, env=os.environ.copy())


def test_config_check_proves_the_verification_path(security_stack, write_config):
    result = runner.invoke(app, ["config", "check"])
    assert ("security: ok (api_keys and audit_logs in orders, Redis ok, /admin/auth-check refuses unknown keys)"
            in result.output), result.output
    write_config(security_stack["text"].replace('[security]\n', '[security]\naudit_table = "request_log"\n'))
    broken = runner.invoke(app, ["config", "check"])
    assert broken.exit_code == 1 and 'security: FAILED' in broken.output and "request_log" in broken.output


def test_revoke_then_claim_the_replacement_once(security_stack):
    url, dsn = security_stack["url"], security_stack["dsn"]
    key_id, plaintext = new_key(dsn)
    result = runner.invoke(app, ["api-key", "revoke", str(key_id), "--yes", "--reason", "found in a paste"])
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if ln.startswith("replacement key"))
    path = line.split("runbooks api-key claim ")[1].split("`")[0]
    assert call(url, plaintext) == 401
    claimed = cli("api-key", "claim", path)
    assert claimed.returncode == 0 and claimed.stdout.startswith("fq_live_"), claimed.stderr
    assert call(url, claimed.stdout.strip()) == 200
    again = cli("api-key", "claim", path)
    assert again.returncode == 2 and "a delivered key is read only once" in again.stderr
    assert "Traceback" not in again.stderr


def test_rate_limit_set_show_revert(security_stack):
    result = runner.invoke(app, ["rate-limit", "set", "tier", "8", "--target", "standard", "--watch-seconds", "0",
                                 "--by", "carol", "--reason", "launch day"])
    assert result.exit_code == 0, result.output
    shown = runner.invoke(app, ["rate-limit", "show"])
    assert "defaults: 60/min, standard 5/min" in shown.output
    assert "tier standard: 8/min (override, 60 min left, set by carol: launch day; default 5/min)" in shown.output
    assert runner.invoke(app, ["rate-limit", "revert", "tier", "--target", "standard"]).exit_code == 0
    assert "no overrides: the defaults apply" in runner.invoke(app, ["rate-limit", "show"]).output
    bad = cli("rate-limit", "set", "region", "8")
    assert bad.returncode == 2 and "scope must be global, tier or key (got 'region')" in bad.stderr
