"""The one Settings model: `runbooks.toml` (path in RUNBOOKS_CONFIG) plus RUNBOOKS_*
environment variables, which win over the file (nested keys with `__`, e.g.
RUNBOOKS_DATABASES__ORDERS__DSN). Each section's model lives beside the code that
uses it; this module only assembles them and resolves target names.
"""

from __future__ import annotations

import os
import re
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from tasks.alerts import AlertsConfig
from tasks.errors import ConfigError
from tasks.incidents import IncidentsConfig
from tasks.notify import NotifySettings
from tasks.pitr import Stanza, stanza_of
from tasks.prometheus import ErrorRate, PrometheusConfig
from tasks.postgres import Database, DatabaseConfig
from tasks.security import SecurityConfig
from tasks.slo import SloSpec
from tasks.service import Controller, ServiceConfig, open_controller
from tasks.encryption import EncryptionConfig
from tasks.storage import LocalStoreConfig, Store, StoreConfig, open_store

DEFAULT_CONFIG = Path("runbooks.toml")
# Target names end up in lock names, Prefect variables, database names and file paths.
TARGET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")
TARGET_NAME_RULE = ("lowercase letters, digits, '-' and '_', starting with a letter or digit, "
                    "at most 48 characters")


class Settings(BaseSettings):
    """Everything a runbook needs to know about the systems it works on."""

    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_", env_nested_delimiter="__",
                                      extra="forbid", case_sensitive=False)

    databases: dict[str, DatabaseConfig] = Field(default_factory=dict)
    stores: dict[str, StoreConfig] = Field(
        default_factory=lambda: {"local": LocalStoreConfig(path=Path("backups"))})
    services: dict[str, ServiceConfig] = Field(default_factory=dict)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    prometheus: PrometheusConfig | None = Field(None, description="where the services' metrics are; "
                                                "without it restarts check only the probes")
    alerts: AlertsConfig | None = Field(None, description="the alert receiver: credentials and routes")
    incidents: IncidentsConfig = Field(default_factory=IncidentsConfig, description="on-call people, "
                                       "escalation and paging for incidents")
    security: SecurityConfig | None = Field(None, description="API keys, audit log and rate limits of a "
                                            "service, for the security runbooks")
    slo: dict[str, SloSpec] = Field(default_factory=dict, description="per service: its SLOs, SLA and "
                                    "metrics, for the monthly report")
    slo_report_dir: Path = Field(Path("reports"), description="where the SLO reports' JSON files go")
    work_dir: Path | None = Field(None, description="where restores spool the uncompressed archive, "
                                  "in a file without a name (needs its size free); default: the system "
                                  "temp dir")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's content arrives as init kwargs; the environment overrides it.
        return env_settings, init_settings

    @field_validator("databases", "stores", "services", mode="before")
    @classmethod
    def _target_names(cls, value: Any, info: ValidationInfo) -> Any:
        for name in value if isinstance(value, dict) else ():
            if not isinstance(name, str) or not TARGET_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid target name "
                                 f"(use {TARGET_NAME_RULE})")
        return value

    @model_validator(mode="after")
    def _references_exist(self) -> "Settings":
        for name, db in self.databases.items():
            if db.store is None and len(self.stores) == 1:
                db.store = next(iter(self.stores))
            if db.store is None:
                raise ValueError(f"databases.{name}.store: say which store its backups go to "
                                 f"(configured: {', '.join(sorted(self.stores))})")
            if db.store not in self.stores:
                raise ValueError(f"databases.{name}.store: no store named {db.store!r} "
                                 f"(configured: {', '.join(sorted(self.stores)) or 'none'})")
        for name, db in self.databases.items():
            for repo in db.pitr.repos if db.pitr else ():
                if repo.store not in self.stores:
                    raise ValueError(f"databases.{name}.pitr.repos: no store named {repo.store!r} "
                                     f"(configured: {', '.join(sorted(self.stores))})")
        for name in self.slo:
            if name not in self.services:
                raise ValueError(f"slo.{name}: no service named {name!r} (an SLO belongs to a [services.<name>])")
        if self.security is not None:
            if self.security.service not in self.services:
                raise ValueError(f"security.service: no service named {self.security.service!r}")
            if self.security.database is not None and self.security.database not in self.databases:
                raise ValueError(f"security.database: no database named {self.security.database!r}")
        for name, svc in self.services.items():
            if svc.database is not None and svc.database not in self.databases:
                raise ValueError(f"services.{name}.database: no database named {svc.database!r}")
        for name, st in self.stores.items():
            if st.replica is not None and st.replica not in self.stores:
                raise ValueError(f"stores.{name}.replica: no store named {st.replica!r}")
            if st.replica == name:
                raise ValueError(f"stores.{name}.replica: a store cannot be its own replica")
        return self

    @property
    def spool_dir(self) -> Path:
        """Where a restore spools its archive (tasks.backup_tasks.anonymous_file)."""
        return self.work_dir or Path(tempfile.gettempdir()) / "runbooks"

    def database(self, name: str) -> Database:
        """The database target `name`, or a ConfigError that lists the known names."""
        if name not in self.databases:
            known = ", ".join(sorted(self.databases)) or "none configured"
            raise ConfigError(f"unknown database {name!r} (known: {known})")
        return Database(name, self.databases[name])

    def service(self, name: str) -> ServiceConfig:
        """The service target `name`, or a ConfigError that lists the known names."""
        if name not in self.services:
            known = ", ".join(sorted(self.services)) or "none configured"
            raise ConfigError(f"unknown service {name!r} (known: {known})")
        return self.services[name]

    def controller(self, name: str) -> Controller:
        return open_controller(name, self.service(name))

    def error_rate(self, name: str) -> ErrorRate | None:
        """The service's error rate in Prometheus; None when no Prometheus is configured."""
        cfg = self.service(name)
        if self.prometheus is None:
            return None
        return ErrorRate(self.prometheus, cfg.error_rate_promql(name), cfg.error_rate_threshold)

    def stanza(self, name: str) -> Stanza:
        """The pgBackRest stanza of database `name`, or a ConfigError when it has no [pitr]."""
        db = self.database(name)
        if db.config.pitr is None:
            raise ConfigError(f"database {name!r} has no [databases.{name}.pitr] section "
                              "(point-in-time recovery is not set up for it)")
        return stanza_of(name, db.config.pitr, self.stores)

    def store(self, name: str) -> StoreConfig:
        if name not in self.stores:
            known = ", ".join(sorted(self.stores)) or "none configured"
            raise ConfigError(f"unknown store {name!r} (known: {known})")
        return self.stores[name]

    def store_names(self) -> list[str]:
        """Primary stores first, then the replicas: where a backup's own record lives."""
        replicas = {st.replica for st in self.stores.values() if st.replica}
        return sorted(self.stores, key=lambda n: (n in replicas, n))

    def stores_for(self, db: Database) -> tuple[str, str | None]:
        """The database's store and that store's replica, if any."""
        primary = db.config.store or ""  # always set once validated
        return primary, self.store(primary).replica

    def open_store(self, name: str) -> Store:
        return open_store(name, self.store(name))

    def encryption(self, name: str) -> EncryptionConfig | None:
        return self.store(name).encryption


def config_path() -> Path:
    return Path(os.environ.get("RUNBOOKS_CONFIG") or DEFAULT_CONFIG)


def load_settings(path: Path | None = None) -> Settings:
    """Load and validate the configuration; every problem names its key."""
    explicit = path is not None or bool(os.environ.get("RUNBOOKS_CONFIG"))
    path = path or config_path()
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    elif explicit:
        raise ConfigError(f"config file {path} not found (set RUNBOOKS_CONFIG to an existing file)")
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: " + "; ".join(_describe(e) for e in exc.errors())) from None
    _resolve_paths(settings, path.parent if path.is_file() else Path.cwd())
    return settings


def _describe(error: Any) -> str:
    """One validation error as `key.path: what was expected` (never the input value)."""
    loc = ".".join(str(p) for p in error["loc"] if not str(p).startswith(("function-", "tagged-union")))
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        tags = str(error.get("ctx", {}).get("expected_tags", "")).replace("'", '"')
        msg = f"expected kind = {tags.replace(', ', ' or ')}" if tags else "a known kind"
    return f"{loc}: {msg}" if loc else msg


def _resolve_paths(settings: Settings, base: Path) -> None:
    """`~` means home; other relative paths mean relative to the file, not to the cwd."""

    def resolve(path: Path) -> Path:
        path = path.expanduser()
        return path if path.is_absolute() else (base / path).resolve()

    for st in settings.stores.values():
        if isinstance(st, LocalStoreConfig):
            st.path = resolve(st.path)
        if st.encryption and st.encryption.key_file:
            st.encryption.key_file = resolve(st.encryption.key_file)
    if settings.work_dir:
        settings.work_dir = resolve(settings.work_dir)
    settings.slo_report_dir = resolve(settings.slo_report_dir)
    for svc in settings.services.values():
        c = svc.controller
        if c.kind == "process":
            c.pid_file, c.log_file = resolve(c.pid_file), resolve(c.log_file)
            c.workdir = resolve(c.workdir) if c.workdir else None
    if settings.security:
        settings.security.delivery_dir = resolve(settings.security.delivery_dir)
        limits = settings.security.rate_limits
        limits.config_file = resolve(limits.config_file) if limits.config_file else None
    for db in settings.databases.values():
        if db.bin_dir:
            db.bin_dir = resolve(db.bin_dir)
        if p := db.pitr:
            p.data_dir, p.socket_dir, p.log_dir = resolve(p.data_dir), resolve(p.socket_dir), resolve(p.log_dir)
            p.config_file = resolve(p.config_file) if p.config_file else None
            p.restore_dir = resolve(p.restore_dir) if p.restore_dir else None
