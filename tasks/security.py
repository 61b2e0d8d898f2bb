"""`[security]`: where a service keeps its API keys, its audit log and its rate limits,
and the policies of the security runbooks (api_key_revocation, rate_limit_adjustment).

Defaults match the demo service (docs/demo-service.md): keys in `api_keys` by SHA-256,
one `api.request` row per request in `audit_logs`, key lookups cached in Redis as
`<prefix>apikey:<sha256>`, limits in `<prefix>rate_limit:{key:<id>|tier:<tier>|global}:
requests_per_minute`.
"""

from __future__ import annotations

import re
from pathlib import Path

import redis
from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from tasks.errors import RunbookError

_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
EVIDENCE_SIGNS = ("new_pii_fields", "pii_fields", "rate_spike", "new_source_ips")


class AutoRevoke(BaseModel):
    """When the evidence alone is enough to revoke without waiting for a person."""

    model_config = ConfigDict(extra="forbid")

    when: list[str] = Field(["new_pii_fields", "rate_spike"], description="every sign listed must be in "
                            f"the evidence ({', '.join(EVIDENCE_SIGNS)}); empty: always ask a person")
    spike_minutes: float = Field(5, gt=0, description="the recent window compared with the key's baseline")
    spike_factor: float = Field(5, gt=1, description="recent requests per minute at least this many times "
                                "the baseline's")
    spike_min_requests: int = Field(20, ge=1, description="and at least this many requests in the window")
    baseline_days: float = Field(7, gt=0, description="how far back 'never touched before' looks")

    @field_validator("when")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in EVIDENCE_SIGNS]
        if unknown:
            raise ValueError(f"unknown sign {unknown[0]!r} (known: {', '.join(EVIDENCE_SIGNS)})")
        return value


class RateLimitsConfig(BaseModel):
    """The service's limits, in requests per minute per key."""

    model_config = ConfigDict(extra="forbid")

    default_rpm: int = Field(60, gt=0, description="the limit without an override in Redis (when no "
                             "config_file says it)")
    tiers: dict[str, int] = Field(default_factory=dict, description="per-tier defaults, where they differ "
                                  "(when no config_file says them)")
    max_factor: float = Field(10, gt=1, description="a new limit above this many times the default, or below "
                              "the default over it, is refused unless forced")
    config_file: Path | None = Field(None, description="the service's own limits file (TOML: default_rpm, "
                                     "[tiers]): the defaults are read from it, and a permanent change is "
                                     "proposed as a diff of it")
    error_rate_threshold: float = Field(0.01, ge=0, le=1, description="while watching an override, an "
                                        "error rate above this reverts it early")


class SecurityConfig(BaseModel):
    """The `[security]` section."""

    model_config = ConfigDict(extra="forbid")

    service: str = Field("api", description="the [services.<name>] whose keys these are (verification "
                         "asks its base_url)")
    database: str | None = Field(None, description="the [databases.<name>] with the keys and the audit log; "
                                 "default: the service's database")
    redis_url: SecretStr | None = Field(None, description="where the service caches keys and keeps limits; "
                                        "none: no cache to drop, no limits to change")
    redis_prefix: str = Field("", description="the service's Redis key namespace")
    keys_table: str = "api_keys"
    audit_table: str = "audit_logs"
    auth_check_path: str = Field("/admin/auth-check", description="POST {key_hash}: the status a request "
                                 "with that key gets now (401 once revoked)")
    key_prefix: str = Field("fq_live_", description="new keys start with this")
    pii_fields: list[str] = Field(["users.email", "users.name"], description="table.field names that are "
                                  "personal data: flagged in the evidence")
    evidence_hours: float = Field(24, gt=0, description="how much of the audit log the evidence covers")
    verify_deadline_seconds: float = Field(30, gt=0, description="how long the service may take to refuse "
                                           "a revoked key")
    delivery_dir: Path = Field(Path("keys"), description="replacement keys are written here once, one file "
                               "each, readable only by the runbooks' OS user; `runbooks api-key claim` "
                               "reads one and deletes it")
    auto_revoke: AutoRevoke = Field(default_factory=AutoRevoke)
    rate_limits: RateLimitsConfig = Field(default_factory=RateLimitsConfig)

    @field_validator("keys_table", "audit_table")
    @classmethod
    def _table(cls, value: str) -> str:
        if not _TABLE.fullmatch(value):
            raise ValueError("a table name, optionally schema-qualified (letters, digits, '_')")
        return value

    def table(self, name: str) -> sql.Composable:
        return sql.Identifier(*name.split("."))

    def cache(self) -> redis.Redis | None:
        if self.redis_url is None:
            return None
        return redis.Redis.from_url(self.redis_url.get_secret_value(), socket_timeout=3, socket_connect_timeout=3)


class SecurityError(RunbookError):
    """A security runbook cannot go on: the message says why; nothing was changed."""
