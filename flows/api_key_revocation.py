"""Runbook 3: revoke a compromised API key, prove the service refuses it, replace it,
and write the ticket, the customer notice and the investigation's first answers."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from flows._common import announce, run_url, security_targets
from tasks import api_keys
from tasks.api_keys import ApiKey, Evidence, Replacement
from tasks.approval import approve
from tasks.concurrency import exclusive
from tasks.config import Settings, load_settings
from tasks.incident_templates import key_compromise_notice
from tasks.notify import Severity
from tasks.postgres import Database, connect
from tasks.prometheus import MetricsUnavailable, query_value
from tasks.report import RunReport, first_line
from tasks.security import SecurityConfig

DEFAULT_REASON = "Security incident - suspected compromise"


class RevocationResult(BaseModel):
    key_id: int
    key_prefix: str
    revoked: bool  # by this run (False: it already was, or a dry run)
    revoked_at: datetime | None = None
    dry_run: bool = False
    seconds_to_401: float | None = None  # from the flow's start
    seconds_alert_to_401: float | None = None
    replacement_id: int | None = None
    delivery_file: str | None = None
    cache_dropped: bool | None = None


@flow(name="api-key-revocation", log_prints=True)
def api_key_revocation(key: str, reason: str = DEFAULT_REASON, replace: bool = True, incident: str | None = None,
                       auto_approve: bool = False, dry_run: bool = False,
                       alerted_at: datetime | None = None,
                       approval_timeout_minutes: float = 240) -> RevocationResult:
    """Revoke a compromised API key and prove the service refuses it (runbook 3).

    Use: a key leaked, or shows suspicious activity (an anomaly alert starts this).
    Steps:
      1. look up the key by id or prefix (unknown or ambiguous: nothing changes);
      2. gather evidence from the audit log: requests by hour, fields read (PII
         flagged), source IPs, rows returned, first and last use, rate against baseline;
      3. decide: `auto_approve`, or the [security.auto_revoke] policy met by the
         evidence, revokes at once; otherwise the run waits for a person's approval
         with the evidence shown;
      4. revoke it in the database (revoked_at, revoke_reason) and drop the service's
         cached lookup of it in Redis;
      5. verify against the live service that the key is refused (401), and measure
         the time from the start (and from the alert) to that;
      6. issue a replacement with the same owner, tier and permissions, its plaintext
         written once to a file only the runbooks' user can read;
      7. publish the security ticket, the customer notice (draft) and the
         investigation's questions answered from the evidence.
    An already revoked key is said so; verification and notices still run.

    Args:
        key: The key's id, or the start of its prefix (e.g. fq_live_1a2b3c4d).
        reason: Why, stored as revoke_reason and shown in the notices.
        replace: Issue a replacement key for the owner.
        incident: The incident this belongs to (the incident run fills it in).
        auto_approve: Revoke without waiting for a person, whatever the evidence.
        dry_run: Look up, gather evidence and decide; change nothing.
        alerted_at: When the alert fired (the incident run fills it in).
        approval_timeout_minutes: How long to wait for a person before giving up
            (nothing is changed then).
    """
    settings = load_settings()
    cfg, db, base_url = security_targets(settings)
    started = time.monotonic()
    if alerted_at is not None and alerted_at.tzinfo is None:
        alerted_at = alerted_at.replace(tzinfo=timezone.utc)  # a time without a zone is UTC
    with RunReport("API key revocation", api_keys.shown(cfg, key)) as run:
        with run.step("look up the key") as step:
            with connect(db) as conn:
                found = api_keys.find(conn, cfg, key)
            step.detail = found.describe()
        run.target = f"key {found.id} ({found.key_prefix}…)"
        with exclusive("api-key", str(found.id)):
            with connect(db) as conn:  # as it is now that this run holds the key: another may have acted
                found = api_keys.find(conn, cfg, str(found.id))
            with run.step("gather evidence") as step:
                with connect(db) as conn:
                    evidence = api_keys.gather_evidence(conn, cfg, found)
                evidence.request_rate = _prometheus_rate(settings, found)
                step.detail = evidence.lines()[0]
            for name, value in evidence.summary():
                run.figure(name, value)
            _publish_evidence(found, evidence)
            return _revoke_and_replace(settings, cfg, db, base_url, run, found, evidence, reason, replace,
                                       incident, auto_approve, dry_run, started, alerted_at,
                                       approval_timeout_minutes)


def _revoke_and_replace(settings: Settings, cfg: SecurityConfig, db: Database, base_url: str, run: RunReport,
                        key: ApiKey, evidence: Evidence, reason: str, replace: bool, incident: str | None,
                        auto_approve: bool, dry_run: bool, started: float,
                        alerted_at: datetime | None, approval_timeout_minutes: float) -> RevocationResult:
    result = RevocationResult(key_id=key.id, key_prefix=key.key_prefix, revoked=False,
                              revoked_at=key.revoked_at, dry_run=dry_run)
    met, why = api_keys.policy_met(cfg, evidence)
    run.figure("Policy", why)
    if dry_run:
        run.outcome = "planned (dry run)"
        action = ("verify it is refused" if key.revoked_at else
                  "revoke at once" if auto_approve or met else "wait for approval, then revoke")
        print(f"Plan: {action}: {key.describe()}" + (", issue a replacement" if replace and not key.replaced_by
                                                      else ""))
        return result
    if key.revoked_at:
        print(f"{key.describe()} already (reason: {key.revoke_reason or 'not recorded'}); verifying and "
              "writing the notices again")
        run.skip("revoke", f"already revoked at {key.revoked_at:%H:%M:%S} UTC")
    else:
        if auto_approve:
            run.figure("Approval", "auto_approve: revoked without waiting")
        elif met:
            run.figure("Approval", f"automatic, {why}")
        else:
            approve(run, f"revoke {key.describe()}", [*evidence.lines(), f"Policy: {why}"], auto=False,
                    wait_seconds=max(1, int(approval_timeout_minutes * 60)),
                    before_wait=lambda: announce(settings, run, Severity.HIGH, f"Revoking {key.key_prefix}… "
                                                 f"waits for approval ({why})."))
        with run.step("revoke") as step:
            result.revoked_at = api_keys.revoke(db, cfg, key.id, reason)
            result.revoked = result.revoked_at is not None
            step.detail = (f"revoked_at {result.revoked_at:%H:%M:%S} UTC" if result.revoked else
                           "another run revoked it first")
    with run.step("drop the cached key") as step:
        try:
            result.cache_dropped = api_keys.drop_cached(cfg, key.key_hash) > 0
            step.detail = ("cached lookup deleted" if result.cache_dropped else
                           "nothing cached" if cfg.redis_url else "no Redis configured")
        except Exception as exc:  # noqa: BLE001 - the database revocation holds; say what is left
            step.outcome = "failed"
            step.detail = (f"{first_line(exc)}: the service may accept a cached lookup of the key until it "
                           "expires")
            run.figure("Cache", step.detail)
    with run.step("verify the service refuses it") as step:
        waited, attempts = api_keys.verify_refused(base_url, cfg, key.key_hash, cfg.verify_deadline_seconds)
        result.seconds_to_401 = time.monotonic() - started
        step.detail = f"401 after {attempts} tries ({waited:.2f} s)"
    run.figure("Time to 401 from the start", f"{result.seconds_to_401:.2f} s")
    if alerted_at:
        result.seconds_alert_to_401 = (datetime.now(timezone.utc) - alerted_at).total_seconds()
        run.figure("Time to 401 from the alert", f"{result.seconds_alert_to_401:.2f} s")
    replacement: Replacement | None = None
    if not replace:
        run.skip("issue a replacement", "replace is off")
    elif key.replaced_by:
        run.skip("issue a replacement", f"already issued: key {key.replaced_by}")
    else:
        with run.step("issue a replacement") as step:
            replacement = api_keys.issue_replacement(db, cfg, key)
            step.detail = f"key {replacement.id} ({replacement.key_prefix}…) in {replacement.delivery_file}"
        result.replacement_id, result.delivery_file = replacement.id, str(replacement.delivery_file)
        run.figure("Replacement", f"key {replacement.id} ({replacement.key_prefix}…), same owner, tier "
                   f"{key.tier}, permissions {', '.join(key.permissions)}; plaintext only in "
                   f"{replacement.delivery_file} (`runbooks api-key claim` reads it once)")
    with run.step("write the ticket and the notices"):
        _publish_notices(settings, cfg, key, evidence, reason, result, replacement, incident)
    run.outcome = "revoked" if result.revoked else "already revoked"
    announce(settings, run, Severity.HIGH, f"API key {key.key_prefix}… of user {key.user_id} "
             f"{'revoked' if result.revoked else 'was already revoked'}; the service refuses it (401)."
             + (f" Replacement key {replacement.id} issued." if replacement else ""))
    return result


def _prometheus_rate(settings: Settings, key: ApiKey) -> str | None:
    if settings.prometheus is None:
        return None
    promql = f'sum(rate(fraiseql_api_key_requests_total{{key_prefix="{key.key_prefix}"}}[5m])) * 60'
    try:
        value = query_value(settings.prometheus, promql)
    except MetricsUnavailable as exc:
        return f"unknown ({first_line(exc)})"
    return "no series" if value is None else f"{value:.1f}/min over 5 min"


def _publish_evidence(key: ApiKey, evidence: Evidence) -> None:
    rows = [{"hour (UTC)": f"{h:%Y-%m-%d %H:00}", "requests": n, "refused": bad, "rows returned": r}
            for h, n, bad, r in evidence.by_hour]
    rows += [{"hour (UTC)": f"field {f}" + (" (PII)" if f in evidence.pii_fields else ""), "requests": n,
              "refused": "", "rows returned": f"first {first:%H:%M:%S}"} for f, n, first in evidence.fields]
    rows += [{"hour (UTC)": f"ip {ip}", "requests": n, "refused": "",
              "rows returned": f"{a:%H:%M:%S}-{b:%H:%M:%S}"} for ip, n, a, b in evidence.source_ips]
    create_table_artifact(table=rows or [{"hour (UTC)": "no requests recorded", "requests": 0}],
                          key=f"api-key-evidence-{key.id}",
                          description=f"Audit-log evidence for API key {key.id} ({key.key_prefix}…)")


def _publish_notices(settings: Settings, cfg: SecurityConfig, key: ApiKey, evidence: Evidence, reason: str,
                     result: RevocationResult, replacement: Replacement | None, incident: str | None) -> None:
    revoked_at = result.revoked_at or datetime.now(timezone.utc)
    accessed = [f"{evidence.requests} requests in the last {evidence.window_hours:g} h, "
                f"{evidence.rows_returned} rows returned",
                "fields read: " + (", ".join(f for f, _, _ in evidence.fields) or "none"),
                "source addresses: " + (", ".join(ip for ip, _, _, _ in evidence.source_ips[:10]) or "none")]
    new_key = (f"A replacement key ({replacement.key_prefix}…) with the same tier and permissions is ready; "
               "it reaches you over a separate secure channel." if replacement else
               "No replacement was issued; create a new key in your console.")
    notice = key_compromise_notice(key.key_prefix, f"user {key.user_id}", revoked_at, reason, accessed, new_key,
                                   incident, settings.incidents.support_contact)
    pii = ", ".join(evidence.pii_fields)
    questions = [
        ("How was the key compromised?",
         f"Not known from the audit log. New source addresses in the last {cfg.auto_revoke.spike_minutes:g} min: "
         f"{', '.join(evidence.new_source_ips) or 'none'}; first use in the window "
         f"{api_keys.when_utc(evidence.first_use)}. "
         "[check where the key was stored and who had it]"),
        ("What access did the attacker gain?",
         f"{evidence.requests} requests ({evidence.refused} refused), {evidence.rows_returned} rows returned; "
         f"fields: {', '.join(f for f, _, _ in evidence.fields) or 'none'}; permissions of the key: "
         f"{', '.join(key.permissions)}."),
        ("Did they access PII?", f"Yes: {pii}." if pii else "No PII field was read in the window."),
        ("What preventive measures?", "[to decide: rotation policy, secret scanning, narrower permissions]"),
    ]
    ticket = (f"SECURITY ticket: API Key Compromise: {key.key_prefix}… (key {key.id}, user {key.user_id})\n"
              f"Key shows suspicious activity. {'Revoked' if result.revoked else 'Already revoked'} at "
              f"{revoked_at:%Y-%m-%d %H:%M:%S} UTC. Reason: {reason}."
              + (f" Incident: {incident}." if incident else "") + (f" Run: {run_url()}" if run_url() else ""))
    answered = "\n".join(f"**{q}**  \n{a}\n" for q, a in questions)
    markdown = (f"# API key {key.id} ({key.key_prefix}…): ticket and notices\n\n## Security ticket\n\n```\n"
                f"{ticket}\n```\n\n## Customer notice (draft, not sent)\n\n```\n{notice}\n```\n\n"
                f"## Post-incident questions, answered from the evidence\n\n{answered}")
    create_markdown_artifact(markdown=markdown, key=f"api-key-notice-{key.id}",
                             description=f"Ticket, customer notice and questions for API key {key.id}")

