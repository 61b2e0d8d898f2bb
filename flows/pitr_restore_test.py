"""Runbook: prove the newest physical backup restores (the weekly PITR restore test)."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone

from prefect import flow
from pydantic import BaseModel

from flows._common import announce
from flows.pitr_restore import restore_and_check
from tasks import pitr, pitr_switch
from tasks.config import load_settings
from tasks.notify import Severity
from tasks.pitr import Target
from tasks.report import RunReport, utc


class PitrRestoreTestResult(BaseModel):
    database: str
    backup_set: str
    recovered_to: datetime | None
    rows: int
    time_to_verified_seconds: float


@flow(name="pitr-restore-test", log_prints=True)
def pitr_restore_test(database: str, repo: int = 1) -> PitrRestoreTestResult:
    """Restore the newest backup set to a scratch directory, recover to the end of the
    archive, verify, measure the RTO, remove it. Only then is the set marked verified
    (a pgBackRest annotation, `runbooks-verified`, shown by `pgbackrest info`).

    Use: weekly (scheduled), and after changing the PITR set-up. Production is not
    touched: the scratch cluster runs on a free port and archives nothing.

    Args:
        database: The database target (one with a pitr section in runbooks.toml).
        repo: The repository whose newest set is tested (1: the first in the config).
    """
    settings = load_settings()
    db = settings.database(database)
    stanza = settings.stanza(database)
    with RunReport("PITR restore test", database) as run:
        try:
            with pitr_switch.holding(run, db, stanza.cfg):
                done = restore_and_check(run, db, stanza, Target(kind="latest"), promote=True, repo=repo,
                                         scratch=True)
                bin_dir = pitr.find_pg_bin(stanza.cfg, db.config.bin_dir)
                with run.step("remove scratch cluster") as step:
                    pitr.stop_cluster(stanza.cfg, bin_dir, done.restored.data_dir)
                    shutil.rmtree(done.restored.data_dir)
                    done.restored.log_file.unlink(missing_ok=True)
                    step.detail = str(done.restored.data_dir)
                with run.step("mark the set verified") as step:
                    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                    pitr.annotate(stanza, done.plan.backup.label, repo, **{
                        "runbooks-verified": stamp, "runbooks-rto-seconds": f"{done.verified_seconds:.1f}"})
                    step.detail = f"{done.plan.backup.label}: runbooks-verified={stamp}"
            run.outcome = "passed"
            print(f"PITR restore test of {database}: {done.plan.backup.label} restored and recovered to "
                  f"{utc(done.check.recovered_to)}, verified in {done.verified_seconds:.1f} s")
            announce(settings, run, Severity.INFO, f"Backup set {done.plan.backup.label} restores and recovers.")
            return PitrRestoreTestResult(database=database, backup_set=done.plan.backup.label,
                                         recovered_to=done.check.recovered_to, rows=done.check.rows,
                                         time_to_verified_seconds=done.verified_seconds)
        except Exception as exc:
            run.outcome = "failed"
            announce(settings, run, Severity.HIGH, f"PITR restore test of {database} failed; its newest "
                     "physical backup may not restore.", failed=exc)
            raise
