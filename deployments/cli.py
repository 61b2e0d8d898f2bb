"""`runbooks`: check the configuration, look at backups, run a runbook now, or serve
every deployment. Errors are one line on stderr (exit 2), never a traceback."""

from __future__ import annotations

from deployments.environment import quiet_prefect

quiet_prefect()

from flows._common import tidy_logs  # noqa: E402 - imports Prefect, so after quiet_prefect

tidy_logs()

import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from typing import Any, Optional  # noqa: E402

import typer  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from deployments.serve import POLL_SECONDS  # noqa: E402
from tasks import backups, postgres  # noqa: E402
from tasks.config import Settings, config_path, load_settings  # noqa: E402
from tasks.probes import failures, probe_all  # noqa: E402
from tasks.prometheus import MetricsUnavailable, query_value  # noqa: E402
from tasks.errors import RunbookError  # noqa: E402
from tasks.report import first_line, human_bytes  # noqa: E402

app = typer.Typer(help="Runbook and disaster-recovery automation on Prefect.", rich_markup_mode=None,
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
config_app = typer.Typer(help="Check the configuration.", no_args_is_help=True)
backups_app = typer.Typer(help="What the backup stores hold.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(backups_app, name="backups")
recovery_app = typer.Typer(help="What database recoveries left behind.", no_args_is_help=True)
app.add_typer(recovery_app, name="recovery")
incident_app = typer.Typer(help="Incidents: list them, acknowledge, resolve.", no_args_is_help=True)
app.add_typer(incident_app, name="incident")
key_app = typer.Typer(help="API keys: revoke one, collect a replacement.", no_args_is_help=True)
app.add_typer(key_app, name="api-key")
limit_app = typer.Typer(help="Rate limits: show, change for a while, revert.", no_args_is_help=True)
app.add_typer(limit_app, name="rate-limit")
slo_app = typer.Typer(help="SLOs: the monthly report, the burn-rate alert rules.", no_args_is_help=True)
app.add_typer(slo_app, name="slo")
pitr_app = typer.Typer(help="Point-in-time recovery (pgBackRest): set up, status, backups, restore, drills.",
                       no_args_is_help=True)
app.add_typer(pitr_app, name="pitr")
class _Out:
    """Prints to whatever sys.stdout/stderr is now (a test runner may swap them);
    wide when piped (a log, a ticket), so ids and DSNs are never cut."""

    def __init__(self, stderr: bool = False) -> None:
        self.stderr = stderr

    def print(self, *args: object, **kwargs: object) -> None:
        stream = sys.stderr if self.stderr else sys.stdout
        Console(file=stream, width=None if stream.isatty() else 200, soft_wrap=True,
                highlight=False).print(*args, **kwargs)  # type: ignore[arg-type]


out = _Out()
err = _Out(stderr=True)


@config_app.command("check")
def config_check() -> None:
    """Validate runbooks.toml and try every database, store, service and Prometheus (one line each)."""
    settings = load_settings()
    out.print(f"config: {config_path()} ok")
    failed = 0
    for name in sorted(settings.databases):
        db = settings.database(name)
        try:
            with postgres.connect(db) as conn:
                version = conn.execute("SHOW server_version").fetchone()[0]
            tool = postgres.find_tool(db, "pg_dump")
            out.print(f"database {name}: ok (PostgreSQL {version}, {db.masked_dsn}, {tool})")
        except Exception as exc:  # noqa: BLE001 - every target gets its line, whatever failed
            failed += 1
            out.print(f"database {name}: [red]FAILED[/red] {first_line(exc)}")
    for name in sorted(settings.stores):
        try:
            store = settings.open_store(name)
            store.check()
            out.print(f"store {name}: ok ({store.describe()})")
        except Exception as exc:  # noqa: BLE001
            failed += 1
            out.print(f"store {name}: [red]FAILED[/red] {first_line(exc)}")
    prometheus_ok = settings.prometheus is not None
    if settings.prometheus:
        try:
            query_value(settings.prometheus, "vector(1)")
            out.print(f"prometheus: ok ({settings.prometheus.url})")
        except MetricsUnavailable as exc:
            failed, prometheus_ok = failed + 1, False
            out.print(f"prometheus: [red]FAILED[/red] {first_line(exc)}")
    for name in sorted(settings.services):
        failed += not _check_service(settings, name, prometheus_ok)
    if settings.security:
        failed += not _check_security(settings)
    for name in sorted(n for n, db in settings.databases.items() if db.pitr):
        failed += not _check_pitr(settings, name)
    if failed:
        raise typer.Exit(1)


def _check_service(settings: Settings, name: str, prometheus_ok: bool) -> bool:
    """One line: its controller answers (tool present, API allowed), its probes pass and,
    with a working Prometheus, its error-rate query returns a number under the threshold."""
    cfg = settings.service(name)
    try:
        state = settings.controller(name).status().detail
    except Exception as exc:  # noqa: BLE001
        out.print(f"service {name}: [red]FAILED[/red] {first_line(exc)}")
        return False
    problems = failures(probe_all(cfg.base_url, cfg.probe_timeout))
    errors = settings.error_rate(name)
    if errors and not prometheus_ok:
        state += "; error rate not read (Prometheus failed)"
    elif errors:
        try:
            rate = errors.read()
            state += f"; error rate {errors.describe(rate)}"
            if errors.too_high(rate):
                problems.append("error rate over its threshold")
        except MetricsUnavailable as exc:
            problems.append(f"error rate unknown: {first_line(exc)}")
    if problems:
        out.print(f"service {name}: [red]UNHEALTHY[/red] {'; '.join(problems)} ({state})")
        return False
    out.print(f"service {name}: ok ({state}; {cfg.base_url} probes pass)")
    return True


def _check_security(settings: Settings) -> bool:
    """One line: the key and audit tables answer, the service's Redis answers, and its
    auth check refuses a key that does not exist (how revocations are verified)."""
    import hashlib
    import secrets

    import httpx
    from psycopg import sql

    from flows._common import security_targets
    from tasks.rate_limits import open_cache

    try:
        cfg, db, base_url = security_targets(settings)
        with postgres.connect(db) as conn:
            for table in (cfg.keys_table, cfg.audit_table):
                conn.execute(sql.SQL("SELECT 1 FROM {} LIMIT 1").format(cfg.table(table)))
        cache = "no Redis"
        if cfg.redis_url is not None:
            open_cache(cfg).close()
            cache = "Redis ok"
        probe = hashlib.sha256(secrets.token_bytes(16)).hexdigest()
        answer = httpx.post(base_url.rstrip("/") + cfg.auth_check_path, json={"key_hash": probe}, timeout=5)
        if answer.status_code != 401:
            raise RunbookError(f"{cfg.auth_check_path} answered {answer.status_code} for an unknown key, not 401")
    except Exception as exc:  # noqa: BLE001 - one line, whatever failed
        out.print(f"security: [red]FAILED[/red] {first_line(exc)}")
        return False
    out.print(f"security: ok ({cfg.keys_table} and {cfg.audit_table} in {db.name}, {cache}, "
              f"{cfg.auth_check_path} refuses unknown keys)")
    return True


def _check_pitr(settings: Settings, name: str) -> bool:
    """One line: pgbackrest.conf is as `pitr setup` writes it, PostgreSQL has the settings,
    `pgbackrest check` archives a segment to every repository, and the archive is not failing."""
    from tasks import pitr

    try:
        stanza = settings.stanza(name)
        dsn = settings.database(name).dsn
        if not stanza.conf_path.is_file() or stanza.conf_path.read_text() != pitr.render_conf(stanza):
            raise RunbookError(f"{stanza.conf_path} is missing or differs from the config "
                               f"(run: runbooks pitr setup {name})")
        if pending := pitr.pending_settings(dsn, stanza):
            raise RunbookError(f"PostgreSQL settings differ: {', '.join(pending)} (run: runbooks pitr setup {name})")
        stanza.run("check", timeout=600)
        status = pitr.archiver_status(dsn)
        if status["failing"]:
            raise RunbookError(f"archiving fails since {status['last_failed_time']:%Y-%m-%d %H:%M:%S} "
                               f"({status['failed_count']} failures)")
        sets = len(stanza.info().backups)
    except Exception as exc:  # noqa: BLE001 - one line, whatever failed
        out.print(f"pitr {name}: [red]FAILED[/red] {first_line(exc)}")
        return False
    out.print(f"pitr {name}: ok (stanza {stanza.name}, {len(stanza.repos)} repositories, {sets} backup sets, "
              f"archive lag {status['lag_seconds']:.0f} s)")
    return True


def _age(when: datetime) -> str:
    seconds = (datetime.now(timezone.utc) - when).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


@backups_app.command("list")
def backups_list(store: Optional[str] = typer.Option(None, help="only this store"),
                 database: Optional[str] = typer.Option(None, help="only this database")) -> None:
    """Backups in each store, newest first: size, age, verified or not."""
    settings = load_settings()
    if database:
        settings.database(database)
    names = [store] if store else settings.store_names()
    for name in names:
        entries = backups.list_backups(settings.open_store(name), database)
        table = Table(title=f"store {name}", title_justify="left")
        for col in ("backup id", "database", "taken (UTC)", "age", "size", "rows", "verified"):
            table.add_column(col, justify="right" if col in ("size", "rows", "age") else "left")
        for b in entries:
            m, v = b.manifest, b.verification
            verified = ("[green]yes[/green]" if b.verified else
                        "[red]FAILED[/red]" if v else "not yet")
            table.add_row(m.id, m.database, f"{m.finished_at:%Y-%m-%d %H:%M}", _age(m.finished_at),
                          human_bytes(m.stored_bytes), str(m.total_rows), verified)
        if entries:
            out.print(table)
        else:
            out.print(f"store {name}: no backups")


@backups_app.command("show")
def backups_show(backup_id: str, store: Optional[str] = typer.Option(None, help="look only here")) -> None:
    """Everything the manifest and the latest restore test say about one backup."""
    backups.check_backup_id(backup_id)
    settings = load_settings()
    for name in [store] if store else settings.store_names():
        st = settings.open_store(name)
        if st.head(backups.manifest_key(backup_id)) is None:
            continue
        m = backups.load_manifest(st, backup_id)
        v = backups.load_verification(st, backup_id)
        out.print(f"[bold]{m.id}[/bold] in {st.describe()}")
        rows = [("database", f"{m.database} ({m.dbname}, PostgreSQL {m.server_version})"),
                ("taken", f"{m.started_at:%Y-%m-%d %H:%M:%S} -> {m.finished_at:%H:%M:%S} UTC "
                          f"({_age(m.finished_at)} ago)"),
                ("object", m.object_key),
                ("format", f"pg_dump {m.format}, {m.compression} level {m.compression_level}"),
                ("encryption", (f"client-side AES-256-GCM, {m.encryption} key {m.key_id}" if m.encryption
                                else "no client-side") + (f"; SSE-KMS {m.server_side_encryption}"
                                                          if m.server_side_encryption else "")),
                ("sizes", f"database {human_bytes(m.db_size_bytes)}, dump {human_bytes(m.dump_bytes)}, "
                          f"stored {human_bytes(m.stored_bytes)}"),
                ("throughput", f"{m.throughput_mb_s:.1f} MB/s over {m.duration_seconds:.1f} s"),
                ("sha256", m.sha256),
                ("integrity", f"checked {m.integrity_checked_at:%Y-%m-%d %H:%M} UTC, "
                              f"{m.toc_entries} archive entries" if m.integrity_checked_at else "not checked"),
                ("replica", f"{m.replica.store} (sha256 verified {m.replica.copied_at:%Y-%m-%d %H:%M})"
                            if m.replica else "none"),
                ("verified", ("yes" if v.passed else "FAILED") + f", {v.checked_at:%Y-%m-%d %H:%M} UTC, "
                             f"{v.time_to_verified_seconds:.1f} s to verified" if v else "not yet")]
        for k, val in rows:
            out.print(f"  {k:<11} {val}")
        if v and v.mismatches:
            out.print(f"  {'problems':<11} " + "; ".join(v.mismatches))
        out.print(f"  {'tables':<11} " + ", ".join(f"{t}={n}" for t, n in m.tables.items()))
        return
    raise RunbookError(f"no backup {backup_id!r} in " + (f"store {store!r}" if store else "any configured store"))


@app.command("backup")
def run_backup(database: str, dry_run: bool = typer.Option(False, "--dry-run")) -> None:
    """Back up DATABASE now (the backup-database flow)."""
    from flows.backup_database import backup_database

    load_settings().database(database)  # a wrong name is one line, not a failed run
    backup_database(database=database, dry_run=dry_run)


@app.command("restore-test")
def run_restore_test(database: str, backup_id: Optional[str] = typer.Option(None, "--backup-id"),
                     dry_run: bool = typer.Option(False, "--dry-run")) -> None:
    """Restore-test DATABASE's newest backup (or --backup-id) now (--dry-run: the plan only)."""
    from flows.restore_test import restore_test

    load_settings().database(database)
    if backup_id is not None:
        backups.check_backup_id(backup_id)
    restore_test(database=database, backup_id=backup_id, dry_run=dry_run)


@app.command("retention")
def run_retention(database: Optional[str] = typer.Option(None),
                  dry_run: bool = typer.Option(False, "--dry-run"),
                  yes: bool = typer.Option(False, "--yes", help="approve the deletion up front")) -> None:
    """Apply backup retention now (--dry-run lists what would go). Without --yes the run
    waits for approval in the Prefect UI before deleting anything."""
    from flows.backup_retention import backup_retention

    if database is not None:
        load_settings().database(database)
    backup_retention(database=database, dry_run=dry_run, auto_approve=yes)


@app.command("restart")
def run_restart(service: str, force: bool = typer.Option(False, "--force", help="restart even if healthy"),
                dry_run: bool = typer.Option(False, "--dry-run")) -> None:
    """Runbook 1: restart SERVICE if its probes fail, and prove it recovered."""
    from flows.service_restart import service_restart

    load_settings().service(service)
    service_restart(service=service, force=force, dry_run=dry_run)


@app.command("health")
def run_health(metrics_file: Optional[str] = typer.Option(None, help="also write Prometheus metrics here")) -> None:
    """Probe every configured service once (the health-check flow)."""
    from flows.health_check import health_check

    health_check(metrics_file=metrics_file)


@key_app.command("revoke")
def key_revoke(key: str = typer.Argument(..., help="the key's id or the start of its prefix"),
               reason: str = typer.Option("Security incident - suspected compromise", help="stored with it"),
               replace: bool = typer.Option(True, "--replace/--no-replace", help="issue a replacement key"),
               yes: bool = typer.Option(False, "--yes", help="revoke without waiting for approval"),
               dry_run: bool = typer.Option(False, "--dry-run")) -> None:
    """Runbook 3: revoke KEY, prove the service refuses it, issue its replacement."""
    from flows.api_key_revocation import api_key_revocation

    result = api_key_revocation(key=key, reason=reason, replace=replace, auto_approve=yes, dry_run=dry_run)
    if result.delivery_file:
        out.print(f"replacement key {result.replacement_id}: `runbooks api-key claim {result.delivery_file}` "
                  "shows it once")


@key_app.command("claim")
def key_claim(path: str = typer.Argument(..., help="the delivery file the revocation named")) -> None:
    """Print a replacement key from its delivery file, once: the file is deleted."""
    from pathlib import Path

    from tasks.api_keys import claim

    from flows._common import security_targets

    cfg, _, _ = security_targets(load_settings())
    print(claim(Path(path), cfg.delivery_dir))  # the key alone on stdout, for a pipe into a secret store


@limit_app.command("show")
def limit_show() -> None:
    """The rate-limit overrides in force: scope, value, time left, who and why."""
    from flows._common import security_targets
    from flows.rate_limit_adjustment import resolve_scope
    from tasks import rate_limits

    cfg, db, _ = security_targets(load_settings())
    cache = rate_limits.open_cache(cfg)
    default, tiers = rate_limits.defaults(cfg.rate_limits)
    out.print(f"defaults: {default}/min" + "".join(f", {t} {n}/min" for t, n in sorted(tiers.items())))
    found = 0
    for key in sorted(cache.scan_iter(f"{cfg.redis_prefix}rate_limit:*:requests_per_minute")):
        middle = key.decode().removeprefix(f"{cfg.redis_prefix}rate_limit:").removesuffix(":requests_per_minute")
        kind, _, name = middle.partition(":")
        if kind not in ("global", "tier", "key"):
            continue
        try:
            scope = resolve_scope(db, cfg, kind, name or None, any_tier=True)  # type: ignore[arg-type]
        except RunbookError:  # e.g. an override left for a key that is gone
            scope = rate_limits.Scope(kind=kind, name=name)  # type: ignore[arg-type]
        current = rate_limits.read(cache, cfg, scope)
        out.print(f"{kind} {name}".strip() + f": {current.describe()}")
        found += 1
    if not found:
        out.print("no overrides: the defaults apply")


@limit_app.command("set")
def limit_set(scope: str = typer.Argument(..., help="global, tier or key"),
              limit: int = typer.Argument(..., help="requests per minute per key"),
              target: Optional[str] = typer.Option(None, help="the tier, or the key's id or prefix"),
              minutes: float = typer.Option(60, help="how long the override lasts"),
              reason: str = typer.Option("", help="why (recorded)"), by: str = typer.Option("", help="your name"),
              permanent: bool = typer.Option(False, "--permanent", help="propose a change to the limits file"),
              force: bool = typer.Option(False, "--force", help="allow a limit beyond the bounds"),
              watch_seconds: float = typer.Option(300, help="how long to watch it afterwards"),
              dry_run: bool = typer.Option(False, "--dry-run")) -> None:
    """Runbook 4: change a rate limit for a while, watch it, record the decision."""
    from flows.rate_limit_adjustment import rate_limit_adjustment

    _scope_kind(scope)
    rate_limit_adjustment(scope=scope, limit=limit, target=target, duration_minutes=minutes,  # type: ignore[arg-type]
                          reason=reason, requested_by=by, permanent=permanent, force=force,
                          watch_seconds=watch_seconds, dry_run=dry_run)


@limit_app.command("revert")
def limit_revert(scope: str = typer.Argument(..., help="global, tier or key"),
                 target: Optional[str] = typer.Option(None, help="the tier, or the key's id or prefix"),
                 reason: str = typer.Option("", help="why (recorded)"),
                 by: str = typer.Option("", help="your name")) -> None:
    """Undo a rate-limit override before it expires."""
    from flows.rate_limit_adjustment import rate_limit_revert

    _scope_kind(scope)
    rate_limit_revert(scope=scope, target=target, reason=reason, requested_by=by)  # type: ignore[arg-type]


@slo_app.command("report")
def slo_report_now(service: str, month: Optional[str] = typer.Option(None, help="YYYY-MM; default: the last month")) -> None:
    """The SLO and SLA report of SERVICE for a month (the slo-report flow)."""
    from flows.slo_report import slo_report

    result = slo_report(service=service, month=month)
    out.print(f"report: {result.report_file} (and its chart beside it)")


@slo_app.command("rules")
def slo_rules(output: str = typer.Option("monitoring/slo-rules.yml", help="where to write them; - for stdout")) -> None:
    """Write the burn-rate alert rules of every [slo.<service>] (check them with promtool)."""
    from pathlib import Path

    import yaml

    from tasks.slo import burn_rate_rules

    settings = load_settings()
    jobs = {name: settings.services[name].prometheus_job or name for name in settings.slo}
    text = ("# Generated by `runbooks slo rules` from runbooks.toml's [slo.<service>] sections; edit those.\n"
            + yaml.safe_dump(burn_rate_rules(settings.slo, jobs), sort_keys=False, width=200))
    if output == "-":
        print(text, end="")
        return
    Path(output).write_text(text)
    out.print(f"wrote {output}: {len(settings.slo)} services (promtool check rules {output})")


@pitr_app.command("setup")
def pitr_setup(database: str, restart: bool = typer.Option(False, "--restart", help="restart the cluster if "
               "wal_level or archive_mode must change")) -> None:
    """Write pgbackrest.conf and the PostgreSQL settings PITR needs, create the stanza, and
    prove it with `pgbackrest check`."""
    from tasks import pitr

    settings = load_settings()
    db = settings.database(database)
    stanza = settings.stanza(database)
    for line in pitr.setup(stanza, db.dsn, pitr.find_pg_bin(stanza.cfg, db.config.bin_dir), restart):
        out.print(line)
    out.print(f"pitr {database}: set up; take a first full backup: runbooks pitr backup {database} --type full")


@pitr_app.command("status")
def pitr_status(database: str) -> None:
    """The archiver's state and every backup set: what point in time can be reached."""
    from tasks import pitr, pitr_switch

    settings = load_settings()
    stanza = settings.stanza(database)
    unsettled = pitr_switch.describe(stanza.cfg)
    if unsettled:
        out.print(f"[red]unsettled:[/red] {escape(unsettled)}")
    status = pitr.archiver_status(settings.database(database).dsn)
    last = status["last_archived_time"]
    out.print(f"archiving: {'[red]FAILING[/red]' if status['failing'] else 'ok'}; last {status['last_archived_wal']} "
              f"at {last:%Y-%m-%d %H:%M:%S} UTC; lag {status['lag_seconds']:.0f} s; {status['ready']} waiting"
              if last else "archiving: nothing archived yet")
    info = stanza.info()
    table = Table("repo", "set", "type", "ended (UTC)", "database", "stored", "verified")
    for b in info.backups:
        table.add_row(f"repo{b.repo}", b.label, b.type, f"{b.stopped:%Y-%m-%d %H:%M:%S}", human_bytes(b.size),
                      human_bytes(b.repo_size), "ERROR" if b.error else (b.verified_at or "not yet"))
    out.print(table)
    for repo, (archive_id, first, newest) in sorted(info.archives.items()):
        out.print(f"repo{repo} WAL ({archive_id}): {first} .. {newest}")


@pitr_app.command("backup")
def pitr_backup_now(database: str, type: str = typer.Option("incr", "--type", help="full, diff or incr")) -> None:
    """Take a pgBackRest backup now (the pitr-backup flow)."""
    from flows.pitr_backup import pitr_backup

    if type not in ("full", "diff", "incr"):
        raise RunbookError(f"--type must be full, diff or incr (got {type!r})")
    pitr_backup(database=database, type=type)  # type: ignore[arg-type]


@pitr_app.command("restore")
def pitr_restore_now(database: str,
                     time: Optional[str] = typer.Option(None, "--time", help="recover to this second, with a zone, "
                                                        "e.g. 2026-12-07T10:15:00+00:00"),
                     restore_point: Optional[str] = typer.Option(None, "--restore-point", help="a named restore point"),
                     promote: bool = typer.Option(False, "--promote", help="end recovery at the target (writable)"),
                     switch: bool = typer.Option(False, "--switch", help="replace production with the restored cluster"),
                     yes: bool = typer.Option(False, "--yes", help="with --switch: you approve it here"),
                     backup_set: Optional[str] = typer.Option(None, "--backup-set", help="restore this set"),
                     repo: int = typer.Option(1, "--repo", help="repository to restore from")) -> None:
    """Restore DATABASE's cluster to a point in time beside production (or --switch to it)."""
    from flows.pitr_restore import pitr_restore

    if switch and not yes:
        raise RunbookError("--switch replaces production: add --yes to approve it here, or start the "
                           "pitr-restore deployment from the UI and approve it there")
    r = pitr_restore(database=database, target_time=time, restore_point=restore_point, promote=promote,
                     switch=switch, backup_set=backup_set, repo=repo, auto_approve=yes)
    out.print(f"recovered to {r.recovered_to:%Y-%m-%d %H:%M:%S} UTC" if r.recovered_to else "recovered")
    out.print(f"{'production' if r.switched else 'side cluster'}: port {r.port}, data directory {r.data_dir}")


@pitr_app.command("verify")
def pitr_verify_now(database: str) -> None:
    """Check every backup file and WAL segment in the repositories (the pitr-verify flow)."""
    from flows.pitr_backup import pitr_verify

    pitr_verify(database=database)


@pitr_app.command("restore-test")
def pitr_restore_test_now(database: str) -> None:
    """Restore the newest set to scratch, recover, verify, remove (the pitr-restore-test flow)."""
    from flows.pitr_restore_test import pitr_restore_test

    pitr_restore_test(database=database)


@pitr_app.command("drill")
def pitr_drill_now(database: str, seconds: int = typer.Option(30, help="how long to write before the kill")) -> None:
    """The RPO drill on a staging cluster (drill = true): kill it, restore, count what was lost."""
    from flows.pitr_drill import pitr_drill

    r = pitr_drill(database=database, write_seconds=seconds)
    out.print(f"RPO {r.rpo_seconds:.1f} s ({r.markers_lost} of {r.markers_written} markers lost), "
              f"target {r.rpo_target_seconds} s: {'met' if r.met else 'MISSED'}; back in {r.rto_seconds:.1f} s")


def _scope_kind(scope: str) -> None:
    if scope not in ("global", "tier", "key"):
        raise RunbookError(f"scope must be global, tier or key (got {scope!r})")


@recovery_app.command("cleanup")
def recovery_cleanup(database: Optional[str] = typer.Option(None, help="only this database"),
                     older_than: float = typer.Option(7.0, "--older-than", metavar="DAYS",
                                                      help="pre-restore copies older than this many days"),
                     yes: bool = typer.Option(False, "--yes", help="drop without asking")) -> None:
    """Settle runs that died (put production back or finish their swap, start the services
    they stopped, drop their half-restored databases; for a PITR cluster, finish or undo a
    switch of its data directory), then list the pre-restore copies older than
    --older-than days and the abandoned restore databases, and drop them after you confirm."""
    from tasks import pitr_switch, recovery
    from tasks.concurrency import exclusive

    settings = load_settings()
    names = [settings.database(database).name] if database else sorted(settings.databases)
    now = datetime.now(timezone.utc)
    for name in names:
        db = settings.database(name)
        store = settings.open_store(db.config.store or "")
        with exclusive("database", name, wait_seconds=30):  # never under a live run's feet
            settled = recovery.settle_abandoned(settings, db, store, lambda line: out.print(f"{name}: {line}"))
            if db.config.pitr is not None and pitr_switch.read(db.config.pitr) is not None:
                switched: list[str] = []
                with pitr_switch.holding(None, db, db.config.pitr, say=switched.append, wait_seconds=30):
                    for line in switched:
                        out.print(f"{name}: {line}")
                settled += switched
            found = recovery.leftovers(db, store, older_than, now)
            if not found:
                out.print(f"{name}: nothing to clean up" + (" more" if settled else ""))
                continue
            table = Table(title=f"database {name} ({db.masked_dsn})", title_justify="left")
            for col in ("database", "kind", "created (UTC)", "size"):
                table.add_column(col, justify="right" if col == "size" else "left")
            for x in found:
                table.add_row(x.name, x.kind, f"{x.created:%Y-%m-%d %H:%M}" if x.created else "?",
                              human_bytes(x.size_bytes))
            out.print(table)
            if not yes and not typer.confirm(f"Drop these {len(found)} databases?", default=False):
                out.print(f"{name}: nothing dropped")
                continue
            for x in found:
                postgres.drop_database(db, x.name)
                out.print(f"{name}: dropped {x.name}")


@contextmanager
def _prefect() -> Iterator[Any]:
    """A Prefect client on the server the incidents live on (as `runbooks run` finds it)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.server import require_server

    with temporary_settings({PREFECT_API_URL: require_server()}), get_client(sync_client=True) as client:
        yield client


@incident_app.command("list")
def incident_list(limit: int = typer.Option(20, help="how many, newest first")) -> None:
    """The newest incidents: id, severity, status, who acknowledged, title."""
    from tasks import incidents

    with _prefect() as client:
        found = incidents.recent(client, min(max(limit, 1), 200))
    if not found:
        out.print("no incidents")
        return
    table = Table(title_justify="left")
    for col in ("incident", "severity", "status", "declared (UTC)", "acknowledged by", "channel", "title"):
        table.add_column(col)
    for r in found:
        table.add_row(r.id, r.severity.value, r.status, f"{r.declared_at:%Y-%m-%d %H:%M}", r.acknowledged_by or "",
                      r.channel or "", escape(r.title))
    out.print(table)


@incident_app.command("ack")
def incident_ack(incident_id: str, by: str = typer.Option(..., "--by", help="your name, as the report shows it")) -> None:
    """Acknowledge INCIDENT_ID: escalation stops; the channel and the report say who."""
    from tasks import incidents

    with _prefect() as client:
        record = incidents.find(client, incident_id)
        new = incidents.tell(client, record, incidents.ACK, {"by": by.strip()[:80], "via": "cli"}, sender="cli")
        if new and _ended(client, record):  # no run reads it any more: the record takes it
            record.status, record.acknowledged_by = "acknowledged", by.strip()[:80]
            incidents.save(client, record)
    out.print(f"{record.id} acknowledged by {escape(by)}" if new else
              f"{record.id} was acknowledged already" + (f" by {escape(record.acknowledged_by)}"
                                                         if record.acknowledged_by else ""))


@incident_app.command("resolve")
def incident_resolve(incident_id: str, by: str = typer.Option(..., "--by", help="your name"),
                     note: str = typer.Option("", "--note", help="how it was resolved")) -> None:
    """Resolve INCIDENT_ID by hand (e.g. fixed without its alert clearing): the run posts
    the resolution and writes the post-incident report. An incident whose run has ended
    (left open after its wait) is marked resolved in its record."""
    from tasks import incidents

    with _prefect() as client:
        record = incidents.find(client, incident_id)
        if record.status == "resolved":
            raise RunbookError(f"{record.id} is resolved already")
        new = incidents.tell(client, record, incidents.RESOLVE, {"by": by.strip()[:80], "note": note.strip()[:500]},
                             sender="cli")
        ended = _ended(client, record)
        if ended:
            record.status, record.resolved_at = "resolved", datetime.now(timezone.utc)
            incidents.save(client, record)
    if ended:
        out.print(f"{record.id}: marked resolved; its run had ended ({ended}), so no resolution is posted "
                  "and its report stays as it was")
    else:
        out.print(f"{record.id}: resolution sent; its run posts it and writes the report" if new else
                  f"{record.id}: a resolution was sent already")


def _ended(client: Any, record: Any) -> str | None:
    """The final state of the incident's run, or None while it runs (or waits to start)."""
    state = client.read_flow_run(record.flow_run_id).state
    return state.name if state is not None and state.is_final() else None


@app.command("run")
def run_deployment(name: str = typer.Argument(..., help="deployment name from prefect.yaml, e.g. backup-orders"),
                   param: list[str] = typer.Option([], "--param", "-p", help="key=value (repeatable)"),
                   watch: bool = typer.Option(False, "--watch", help="follow the run to its end")) -> None:
    """Start a deployment on the Prefect server (PREFECT_API_URL, or the one `runbooks serve`
    started); parameters are checked first. --watch: exit 0 completed, 1 failed, 2 operator error."""
    from deployments import run

    flow_run, api_url = run.start(name, run.parse_params(param))
    out.print(f"started run {flow_run.name} ({flow_run.id}) of {name}: {run.run_page(api_url, flow_run.id)}")
    if watch:
        raise typer.Exit(run.watch(flow_run.id, api_url, say=out.print))


@app.command("serve")
def serve(port: int = typer.Option(4200, help="port of the local Prefect server, when one is started"),
          poll_seconds: float = typer.Option(POLL_SECONDS, envvar="RUNBOOKS_SERVE_POLL_SECONDS",
                                             help="how often to look for runs to start"),
          receiver: Optional[bool] = typer.Option(None, "--receiver/--no-receiver",
                                                  help="run the alert receiver too (default: when runbooks.toml "
                                                       "has [alerts])"),
          receiver_host: str = typer.Option("127.0.0.1", help="the receiver's address"),
          receiver_port: int = typer.Option(9095, help="the receiver's port")) -> None:
    """Serve every deployment in prefect.yaml (schedules included) from this process, and
    the alert receiver beside them when [alerts] is configured. Uses PREFECT_API_URL when
    set; otherwise starts a local Prefect server with its UI."""
    from deployments.serve import serve_all

    serve_all(port=port, poll_seconds=poll_seconds, say=out.print, receiver=receiver, receiver_host=receiver_host,
              receiver_port=receiver_port)


@app.command("receiver")
def receiver(host: str = typer.Option("127.0.0.1", help="address to listen on"),
             port: int = typer.Option(9095, help="port to listen on")) -> None:
    """Take Alertmanager's webhooks on http://HOST:PORT/alerts and start the runbook each
    firing alert's route names, once per alert ([alerts] in runbooks.toml)."""
    from deployments.receiver import serve_receiver

    serve_receiver(host, port, say=out.print)


def main() -> None:
    try:
        app()
    except RunbookError as exc:
        err.print(f"[red]error:[/red] {escape(first_line(exc))}")  # a message's [brackets] are text
        sys.exit(2)
    except Exception as exc:  # a failed flow run: Prefect has logged it already
        err.print(f"[red]failed:[/red] {escape(first_line(exc))}")
        sys.exit(1)


if __name__ == "__main__":
    main()
