"""Runbooks: physical backups of a cluster with pgBackRest (full weekly, differential
daily, incremental hourly) and the daily `pgbackrest verify` of the repositories."""

from __future__ import annotations

import re
import time
from typing import Literal

from prefect import flow
from pydantic import BaseModel

from flows._common import announce
from tasks import pitr, pitr_switch
from tasks.config import load_settings
from tasks.errors import VerificationError
from tasks.notify import Severity
from tasks.pitr import Stanza
from tasks.report import RunReport, human_bytes, utc


class PitrBackupSet(BaseModel):
    repo: int
    label: str
    type: str
    database_bytes: int
    stored_bytes: int
    seconds: float
    throughput_mb_s: float
    wal_segments_since_previous: int


class PitrBackupResult(BaseModel):
    database: str
    sets: list[PitrBackupSet]
    archive_lag_seconds: float
    archive_failing: bool


@flow(name="pitr-backup", log_prints=True)
def pitr_backup(database: str, type: Literal["full", "diff", "incr"] = "incr") -> PitrBackupResult:
    """Take a pgBackRest backup of the database's cluster into each of its repositories.

    Use: on the schedules (full weekly, diff daily, incr hourly), or by hand before a
    risky change. Steps: the archiver's state first (a failing archive is said, and the
    backup, which waits for its WAL, will fail with pgBackRest's reason); then one
    backup per repository (pgBackRest makes an incr or diff with no full before it a
    full). Reports size, stored size, duration, throughput, the WAL archived since the
    previous set, and the archive lag.

    Args:
        database: The database target (one with a pitr section in runbooks.toml).
        type: full, diff (changes since the last full) or incr (since the last backup).
    """
    settings = load_settings()
    db = settings.database(database)
    stanza = settings.stanza(database)
    with RunReport(f"PITR {type} backup", database) as run:
        try:
            with pitr_switch.holding(run, db, stanza.cfg):
                status = archiver_step(run, stanza, db.dsn)
                sets = [_backup(run, stanza, type, repo.index) for repo in stanza.repos]
            run.figure("Archive lag", f"{status['lag_seconds']:.0f} s ({status['ready']} segments waiting)")
            print(f"PITR {type} backup of {database}: " + "; ".join(
                f"repo{s.repo} {s.label} ({s.type}) {human_bytes(s.stored_bytes)} stored in {s.seconds:.1f} s"
                for s in sets))
            run.outcome = "succeeded"
            announce(settings, run, Severity.INFO, f"Physical {type} backup of {database} done.")
            return PitrBackupResult(database=database, sets=sets, archive_lag_seconds=status["lag_seconds"],
                                    archive_failing=status["failing"])
        except Exception as exc:
            announce(settings, run, Severity.HIGH, f"Physical {type} backup of {database} failed; "
                     "point-in-time recovery relies on the older sets until one succeeds.", failed=exc)
            raise


def archiver_step(run: RunReport, stanza: Stanza, dsn: str) -> dict:
    """The archiver's state as a step; a failing archive is a warning in the report."""
    with run.step("archiver status") as step:
        status = pitr.archiver_status(dsn)
        step.detail = (f"last archived {status['last_archived_wal'] or 'nothing'} at "
                       f"{utc(status['last_archived_time'], 'never')}; {status['ready']} waiting; "
                       f"lag {status['lag_seconds']:.0f} s")
        if status["failing"]:
            step.outcome = "warning"
            step.detail += (f"; ARCHIVING FAILS since {utc(status['last_failed_time'])} "
                            f"({status['failed_count']} failures, last {status['last_failed_wal']})")
    run.figure("Last archived WAL", f"{status['last_archived_wal'] or 'none'} at "
                                    f"{utc(status['last_archived_time'], 'never')}")
    return status


def _backup(run: RunReport, stanza: Stanza, kind: Literal["full", "diff", "incr"], repo: int) -> PitrBackupSet:
    spec = stanza.repos[repo - 1]
    with run.step(f"{kind} backup to repo{repo}") as step:
        step.detail = spec.where
        t0 = time.monotonic()
        made = pitr.backup(stanza, kind, repo)
        seconds = time.monotonic() - t0
        since = (pitr.segment_number(made.wal_stop)[1] - pitr.segment_number(made.previous_wal_stop)[1]
                 if made.wal_stop and made.previous_wal_stop else 0)
        result = PitrBackupSet(repo=repo, label=made.label, type=made.type, database_bytes=made.size,
                               stored_bytes=made.repo_size, seconds=seconds,
                               throughput_mb_s=made.size / 1e6 / seconds if seconds else 0.0,
                               wal_segments_since_previous=max(0, since))
        step.detail = (f"{made.label} ({made.type}): {human_bytes(made.size)} database, "
                       f"{human_bytes(made.repo_size)} stored, {result.throughput_mb_s:.1f} MB/s; "
                       f"{result.wal_segments_since_previous} WAL segments since the previous set")
    run.figure(f"repo{repo} ({spec.store})", step.detail)
    return result


class PitrVerifyResult(BaseModel):
    database: str
    repos_checked: int
    backups: int
    wal_ranges: dict[int, list[str]]


_RANGE = re.compile(r"archiveId: (\S+), wal start: ([0-9A-F]{24}), wal stop: ([0-9A-F]{24})")


@flow(name="pitr-verify", log_prints=True)
def pitr_verify(database: str) -> PitrVerifyResult:
    """Check every repository of the database: `pgbackrest verify` (checksums of every
    backup file and WAL segment) and the WAL chain from the oldest backup on.

    Use: daily (scheduled). Fails, and notifies HIGH, on a corrupt file, a missing WAL
    segment (a hole that recovery cannot cross: it names the segment and the backup sets
    whose recovery stops there) or a backup set in error.

    Args:
        database: The database target (one with a pitr section in runbooks.toml).
    """
    settings = load_settings()
    settings.database(database)
    stanza = settings.stanza(database)
    with RunReport("PITR verify", database) as run:
        try:
            problems: list[str] = []
            ranges: dict[int, list[str]] = {}
            backups = 0
            for repo in stanza.repos:
                with run.step(f"verify repo{repo.index}") as step:
                    found, ranges[repo.index], sets = _verify_repo(stanza, repo.index)
                    backups += sets
                    step.detail = (f"{sets} backup sets; WAL " + ", ".join(ranges[repo.index] or ["none"])
                                   + (f"; {len(found)} problems" if found else "; all files valid"))
                    if found:
                        step.outcome = "failed"
                    problems += [f"repo{repo.index} ({repo.where}): {p}" for p in found]
            run.figure("Backup sets", str(backups))
            if problems:
                raise VerificationError(f"pgBackRest repositories of {database}: " + "; ".join(problems))
            print(f"PITR verify of {database}: {backups} backup sets and their WAL valid in "
                  f"{len(stanza.repos)} repositories")
            return PitrVerifyResult(database=database, repos_checked=len(stanza.repos), backups=backups,
                                    wal_ranges=ranges)
        except Exception as exc:
            announce(settings, run, Severity.HIGH, f"The physical backups of {database} failed "
                     "verification: point-in-time recovery may not reach every second.", failed=exc)
            raise


def _verify_repo(stanza: Stanza, repo: int) -> tuple[list[str], list[str], int]:
    """(problems, WAL ranges as 'start-stop', backup sets) of one repository."""
    proc = stanza.run("--log-level-console=detail", "verify", repo=repo)
    out = proc.stdout + proc.stderr
    problems = []
    if re.search(r"status: error", out):
        detail = " ".join(ln.strip() for ln in out.splitlines()
                          if re.search(r"(total valid|checksum invalid|missing|other|invalid)", ln))
        problems.append(f"pgbackrest verify found invalid files ({detail or 'see its log'})")
    ranges = [(m.group(2), m.group(3)) for m in _RANGE.finditer(out)]
    for (_, stop), (start, _) in zip(ranges, ranges[1:]):
        tli, stop_pos = pitr.segment_number(stop)
        if pitr.segment_number(start)[0] == tli:
            missing = pitr.segment_name(tli, stop_pos + 1)
            problems.append(f"WAL segment {missing} is missing (archive holds {stop}, then {start}): "
                            "recovery cannot pass it")
    info = stanza.info(repo)
    sets = info.usable(repo)
    problems += [f"backup set {b.label} is in error" for b in info.backups if b.repo == repo and b.error]
    return problems, [f"{a}-{b}" for a, b in ranges], len(sets)
