"""`runbooks pitr ...` and the pitr line of `runbooks config check`, against a real
cluster that starts without archiving."""

from __future__ import annotations

from typer.testing import CliRunner

from deployments.cli import app
from tasks.errors import RunbookError
from tasks.pitr import RestartNeeded
from tests.pitr_cluster import pitr_cluster

runner = CliRunner()
SECRET = "cipher-passphrase-never-shown"


def invoke(*args: str):  # type: ignore[no-untyped-def]
    """The command's output, and its error as `main()` would print it (exit 2)."""
    result = runner.invoke(app, list(args))
    assert SECRET not in result.output and SECRET not in str(result.exception)
    return result


def refused(result, kind: type = RunbookError) -> str:  # type: ignore[no-untyped-def]
    assert isinstance(result.exception, kind), (result.output, repr(result.exception))
    return str(result.exception)


def test_setup_says_when_a_restart_is_needed_then_sets_up_once_and_config_check_watches_it():
    with pitr_cluster("pitrcli", set_up=False) as cluster:
        text = cluster.config.read_text().replace('repos = [{ store = "pitrlocal" }]',
                                                  f'repos = [{{ store = "pitrlocal", cipher_pass = "{SECRET}" }}]')
        cluster.config.write_text(text)
        assert cluster.sql("SHOW archive_mode") == [("off",)]

        first = refused(invoke("pitr", "setup", "pitrcli"), RestartNeeded)
        assert "take effect only after a restart" in first and "set archive_mode: 'off' -> 'on'" in first
        assert cluster.sql("SHOW archive_mode") == [("off",)]  # stored, not restarted
        assert cluster.sql("SELECT 1") == [(1,)]

        second = invoke("pitr", "setup", "pitrcli", "--restart")
        assert second.exit_code == 0, second.output
        assert "restarted the cluster" in second.output and "pgbackrest check archived a WAL segment" in second.output
        assert cluster.sql("SHOW archive_mode") == [("on",)]
        conf = (cluster.base / "pgbackrest.conf")
        assert oct(conf.stat().st_mode & 0o777) == "0o600" and "repo1-cipher-type=aes-256-cbc" in conf.read_text()

        again = invoke("pitr", "setup", "pitrcli")
        assert again.exit_code == 0 and not [ln for ln in again.output.splitlines()
                                             if ln.startswith(("wrote", "set ", "restarted"))], again.output

        check = invoke("config", "check")
        assert "pitr pitrcli: ok (stanza pitrcli, 1 repositories, 0 backup sets, archive lag" in check.output, \
            check.output
        assert invoke("pitr", "backup", "pitrcli", "--type", "full").exit_code == 0
        status = invoke("pitr", "status", "pitrcli")
        assert status.exit_code == 0 and "archiving: ok" in status.output and "full" in status.output
        assert "not yet" in status.output  # no restore test has verified the set
        assert "--type must be full, diff or incr" in refused(invoke("pitr", "backup", "pitrcli", "--type", "weekly"))

        conf.write_text(conf.read_text() + "# edited by hand\n")
        drifted = invoke("config", "check")
        assert drifted.exit_code == 1
        assert "pitr pitrcli: FAILED" in drifted.output and "differs from the config (run: runbooks pitr setup" \
            in drifted.output
