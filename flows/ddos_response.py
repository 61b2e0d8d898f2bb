"""Scenario 4: most requests are rate limited across keys. Tell the attack from the
customers it crowds out, and propose limits for a person to approve: lower for the keys
that flood, higher for the tier whose real traffic is being refused."""

from __future__ import annotations

import math
import statistics

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from flows._common import announce, security_targets
from flows.rate_limit_adjustment import assess_traffic
from tasks import rate_limits
from tasks.approval import approve
from tasks.concurrency import exclusive
from tasks.config import load_settings
from tasks.notify import Severity
from tasks.postgres import connect
from tasks.rate_limits import Consumer, Scope
from tasks.report import RunReport
from tasks.security import SecurityConfig

FLOOD_FACTOR = 5  # a key sending this many times the median consumer's requests ...
KNOWN_SHARE = 0.5  # ... mostly from addresses it never used before, floods


class Proposal(BaseModel):
    scope: Scope
    key_prefix: str | None = None
    old: int
    new: int
    why: str


class DdosResult(BaseModel):
    limited_share: float | None
    proposals: list[Proposal]
    applied: bool


def propose(cfg: SecurityConfig, consumers: list[Consumer], window_minutes: float) -> list[Proposal]:
    """Floods: far above the median consumer and mostly from new addresses; each gets its
    tier default divided by max_factor. The tier with the most refused requests among the
    rest gets room for its busiest key's rate and half again, up to max_factor times its
    default."""
    if not consumers:
        return []
    limits = cfg.rate_limits
    median = statistics.median(c.requests for c in consumers)
    floods = [c for c in consumers if c.key_id is not None and c.requests >= FLOOD_FACTOR * max(median, 1)
              and c.known_addresses_share < KNOWN_SHARE]
    out = []
    for c in floods:
        scope = Scope(kind="key", name=str(c.key_id), tier=c.tier)
        default = rate_limits.default_for(limits, scope)
        out.append(Proposal(scope=scope, key_prefix=c.key_prefix, old=default,
                            new=max(1, math.floor(default / limits.max_factor)),
                            why=f"{c.requests} requests in {window_minutes:g} min ({c.limited} limited), "
                                f"{c.known_addresses_share:.0%} from addresses it used before"))
    legit = [c for c in consumers if c not in floods and c.limited and c.tier]
    if legit:
        tiers: dict[str, list[Consumer]] = {}
        for c in legit:
            tiers.setdefault(c.tier or "", []).append(c)
        tier, members = max(tiers.items(), key=lambda kv: sum(c.limited for c in kv[1]))
        scope = Scope(kind="tier", name=tier)
        default = rate_limits.default_for(limits, scope)
        busiest = max(c.requests for c in members) / window_minutes
        new = min(math.floor(default * limits.max_factor), max(default + 1, math.ceil(busiest * 1.5)))
        out.append(Proposal(scope=scope, old=default, new=new,
                            why=f"{sum(c.limited for c in members)} of its requests refused; its busiest key "
                                f"sends {busiest:.0f}/min from addresses it used before"))
    return out


@flow(name="ddos-response", log_prints=True)
def ddos_response(duration_minutes: float = 60, auto_approve: bool = False, dry_run: bool = False,
                  incident: str | None = None, approval_timeout_minutes: float = 240) -> DdosResult:
    """Propose, and after approval apply, limits that hold a flood back and let real
    traffic through (disaster scenario 4, "DDoS attack").

    Use: the RateLimitedGlobally alert (a fifth of all requests limited) starts it
    inside an incident.
    Steps:
      1. assess the last 5 minutes: the share limited and the top consumers, and
         whether each comes from addresses it used the day before;
      2. propose: floods (far above the median consumer, mostly from new addresses)
         get their tier default divided by max_factor; the tier whose real traffic is
         refused most gets room for its busiest key and half again;
      3. wait for a person to approve the proposal (unless `auto_approve`);
      4. apply each as a rate-limit override for `duration_minutes`, with its record.
    Nothing is applied without approval; `rate-limit-revert` undoes each override.

    Args:
        duration_minutes: How long the applied overrides last.
        auto_approve: Apply without waiting for a person.
        dry_run: Assess and propose; change nothing.
        incident: The incident this belongs to (the incident run fills it in).
        approval_timeout_minutes: How long to wait for a person (nothing changes then).
    """
    settings = load_settings()
    cfg, db, _ = security_targets(settings)
    cache = rate_limits.open_cache(cfg)
    with RunReport("DDoS response", incident or "rate limits") as run:
        with run.step("assess the traffic") as step:
            share = assess_traffic(settings, cfg, db, run)
            with connect(db) as conn:
                consumers = rate_limits.top_consumers(conn, cfg, limit=20)
            step.detail = f"{len(consumers)} consumers in the last 5 min"
        with run.step("propose limits") as step:
            proposals = propose(cfg, consumers, 5)
            step.detail = "; ".join(_line(p) for p in proposals) or "nothing to propose"
        _publish(proposals, incident)
        result = DdosResult(limited_share=share, proposals=proposals, applied=False)
        if not proposals or dry_run:
            run.outcome = "nothing to apply" if not proposals else "proposed (dry run)"
            return result
        approve(run, "apply these rate limits for " + f"{duration_minutes:g} min", [_line(p) for p in proposals],
                auto=auto_approve, wait_seconds=max(1, int(approval_timeout_minutes * 60)),
                before_wait=lambda: announce(settings, run, Severity.HIGH, "Rate limits proposed against a "
                                             "flood wait for approval: " + "; ".join(_line(p) for p in proposals)))
        with run.step("apply the limits") as step:
            for p in proposals:
                rate_limits.check_bounds(cfg.rate_limits, p.scope, p.new, duration_minutes, force=True)
                with exclusive("rate-limit", p.scope.slug):  # as rate-limit-adjustment holds it
                    before = rate_limits.read(cache, cfg, p.scope)
                    rate_limits.set_override(cache, cfg, p.scope, p.new, duration_minutes, "ddos-response",
                                             f"DDoS response{f' ({incident})' if incident else ''}: {p.why}", before)
            step.detail = f"{len(proposals)} overrides for {duration_minutes:g} min"
        result.applied = True
        run.outcome = "applied"
        announce(settings, run, Severity.HIGH, "Rate limits applied against a flood: "
                 + "; ".join(_line(p) for p in proposals))
        return result


def _line(p: Proposal) -> str:
    what = f"key {p.key_prefix} ({p.scope.name})" if p.scope.kind == "key" else p.scope.label
    return f"{what}: {p.old} → {p.new}/min ({p.why})"


def _publish(proposals: list[Proposal], incident: str | None) -> None:
    rows = "\n".join(f"| {p.scope.label} | {p.key_prefix or ''} | {p.old} | {p.new} | {p.why} |" for p in proposals)
    create_markdown_artifact(
        markdown=f"# Proposed rate limits{f' for {incident}' if incident else ''}\n\n"
                 "| scope | key | default (/min) | proposed (/min) | why |\n|---|---|---:|---:|---|\n"
                 f"{rows or '| none | | | | no flood and no refused real traffic |'}\n",
        key="ddos-proposal", description="Rate limits proposed against a flood")
