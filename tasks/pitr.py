"""Point-in-time recovery through pgBackRest: its configuration, its commands, and the
PostgreSQL clusters it restores.

pgBackRest does the physical work (WAL archiving, full/diff/incr backups, restore,
verify); this module runs it as the user PostgreSQL runs as, reads its JSON, and owns
what it does not: which backup set really precedes a target, whether the WAL between
is all there, starting a restored cluster on a free port and waiting for its recovery.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from tasks.errors import ConfigError, RunbookError

STANZA = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}")
SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
SEGMENTS_PER_LOG = 256  # 16 MB WAL segments (PostgreSQL's default)


class PitrError(RunbookError):
    """pgBackRest or a restored cluster failed; the message says what and where."""


class TargetOutOfRange(PitrError):
    """The recovery target lies outside what the backups and the archive cover."""


class TargetNotReached(PitrError):
    """Recovery ran out of archived WAL before it saw a transaction after the target."""


class WalGap(PitrError):
    """A WAL segment between the backup and the target is missing from the archive."""


class PitrRepo(BaseModel):
    """One pgBackRest repository, kept in a configured store (`[stores.<name>]`): a local
    path (`<path>/pgbackrest`) or an S3 bucket (`<prefix>/pgbackrest`, SSE-KMS with the
    store's key). A second repository is the cross-region copy: WAL goes to both."""

    model_config = ConfigDict(extra="forbid")

    store: str = Field(description="a [stores.<name>] entry")
    cipher_pass: SecretStr | None = Field(None, description="pgBackRest's own repository encryption "
                                          "(aes-256-cbc) with this passphrase (a secret)")
    retention_full: int = Field(2, ge=1, le=100, description="full backups kept")
    retention_diff: int = Field(7, ge=1, le=100, description="differential backups kept")
    verify_tls: bool = Field(True, description="S3: check the endpoint's certificate (off only for "
                                               "a test endpoint with a self-signed one)")


class PitrConfig(BaseModel):
    """`[databases.<name>.pitr]`: the cluster behind the database, archived and backed up
    physically by pgBackRest for point-in-time recovery."""

    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(description="the cluster's data directory")
    port: int = Field(5432, ge=1, le=65535, description="the cluster's port")
    os_user: str = Field("postgres", description="the OS user PostgreSQL runs as; pgBackRest runs as it")
    socket_dir: Path = Field(Path("/var/run/postgresql"), description="its Unix socket directory")
    control: Literal["pg_ctl", "pg_ctlcluster", "systemd"] = Field(
        "pg_ctl", description="how it is stopped and started")
    cluster: str | None = Field(None, description="pg_ctlcluster: VERSION/NAME, e.g. 15/main; "
                                                  "systemd: the unit, e.g. postgresql@15-main")
    stanza: str | None = Field(None, description="pgBackRest stanza (default: the database's name)")
    repos: list[PitrRepo] = Field(min_length=1, max_length=4)
    archive_timeout: int = Field(30, ge=1, le=3600, description="seconds before a partly filled WAL "
                                 "segment is archived anyway: the bound on the RPO when writes are few")
    process_max: int = Field(2, ge=1, le=32, description="pgBackRest processes for backup and restore")
    compress_level: int = Field(3, ge=1, le=19, description="zstd level")
    config_file: Path | None = Field(None, description="pgbackrest.conf written by `runbooks pitr setup` "
                                     "(default /etc/pgbackrest/<stanza>.conf)")
    restore_dir: Path | None = Field(None, description="where restored data directories are made "
                                     "(default: beside data_dir, so a switch is a rename)")
    log_dir: Path = Field(Path("/var/log/pgbackrest"), description="pgBackRest's own log files")
    verify_query: str | None = Field(None, description="SQL run on a restored cluster in the database; "
                                     "its first column must be true")
    rpo_target_seconds: int = Field(60, ge=1, description="the most data (in seconds) a recovery may lose")
    recovery_timeout_seconds: int = Field(3600, ge=10, description="how long a restored cluster may "
                                          "take to recover")
    prefer_logical_within_seconds: int = Field(300, ge=0, description="database-recovery restores a logical "
                                               "backup taken at most this long before the restore point; "
                                               "otherwise it recovers the cluster to the point (PITR)")
    drill: bool = Field(False, description="allow the RPO drill, which kills this cluster: only for a "
                                           "staging or test cluster")


# --- running pgBackRest and the PostgreSQL tools as the cluster's user ----------------------


def as_user(cfg: PitrConfig, argv: list[str]) -> list[str]:
    """`argv` run as the cluster's OS user: directly when we are that user, through
    runuser when we are root; anything else cannot work and says so."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    if me == cfg.os_user:
        return argv
    if os.geteuid() == 0:
        return ["runuser", "-u", cfg.os_user, "--", *argv]
    raise ConfigError(f"pitr: runbooks runs as {me!r}; pgBackRest must run as {cfg.os_user!r} "
                      "(run the worker as that user or as root)")


def _owner(cfg: PitrConfig) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(cfg.os_user)
    except KeyError:
        raise ConfigError(f"pitr.os_user: no OS user {cfg.os_user!r} on this machine") from None
    return entry.pw_uid, entry.pw_gid


def make_owned_dir(cfg: PitrConfig, path: Path, mode: int = 0o700) -> Path:
    """A directory the cluster's user owns (pgBackRest and PostgreSQL write there)."""
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    if os.geteuid() == 0:
        os.chown(path, *_owner(cfg))
    return path


def find_pg_bin(cfg: PitrConfig, bin_dir: Path | None) -> Path:
    """The server's binaries: the database's bin_dir, else the newest Debian install,
    else whatever pg_ctl is on PATH."""
    candidates = [bin_dir] if bin_dir else []
    candidates += sorted((Path(p) for p in Path("/usr/lib/postgresql").glob("*/bin")),
                         key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    if on_path := shutil.which("pg_ctl"):
        candidates.append(Path(on_path).parent)
    for path in candidates:
        if (path / "pg_ctl").is_file():
            return path
    raise ConfigError("pitr: pg_ctl not found (install the PostgreSQL server or set the database's bin_dir)")


_ERROR_LINE = re.compile(r"(?:ERROR|ASSERT): \[(\d+)\]: (.*)")


def pgbackrest_error(output: str) -> str:
    """pgBackRest's own ERROR lines, without its timestamps and process ids."""
    found = [f"{m.group(2).strip()} [{m.group(1)}]" for m in _ERROR_LINE.finditer(output)]
    if found:
        return "; ".join(dict.fromkeys(found))
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


@dataclass
class Stanza:
    """One database's pgBackRest stanza: the commands, run with its config file."""

    name: str
    cfg: PitrConfig
    repos: list["RepoSpec"]
    conf_path: Path

    def command(self, *args: str, repo: int | None = None) -> list[str]:
        argv = ["pgbackrest", f"--config={self.conf_path}", f"--stanza={self.name}"]
        if repo is not None:
            argv.append(f"--repo={repo}")
        return as_user(self.cfg, [*argv, *args])

    def run(self, *args: str, repo: int | None = None, timeout: float = 6 * 3600,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        if not shutil.which("pgbackrest"):
            raise ConfigError("pitr: pgbackrest is not installed (Debian package 'pgbackrest')")
        argv = self.command(*args, repo=repo)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/")
        except subprocess.TimeoutExpired:
            raise PitrError(f"pgbackrest {args[-1]} (stanza {self.name}) did not finish in {timeout:.0f} s") from None
        if check and proc.returncode != 0:
            raise PitrError(f"pgbackrest {args[-1]} (stanza {self.name}"
                            + (f", repo{repo}" if repo else "") + ") failed: "
                            + self.scrub(pgbackrest_error(proc.stderr + proc.stdout)))
        return proc

    def scrub(self, text: str) -> str:
        """The text without any repository secret (an S3 error may echo a key id)."""
        for repo in self.repos:
            for value in repo.secret_options.values():
                text = text.replace(value, "***") if value else text
        return text

    # -- reading ----------------------------------------------------------------------------

    def info(self, repo: int | None = None) -> "StanzaInfo":
        proc = self.run("--output=json", "info", repo=repo, timeout=600)
        try:
            data = json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise PitrError(f"pgbackrest info (stanza {self.name}) printed no JSON") from None
        return StanzaInfo.parse(data[0] if data else {})

    def archived_segments(self, repo: int, archive_id: str) -> dict[str, datetime]:
        """Every WAL segment in the repository's archive, with the time it was archived."""
        proc = self.run("--output=json", "--recurse", "repo-ls", f"archive/{self.name}/{archive_id}",
                        repo=repo, timeout=600)
        found: dict[str, datetime] = {}
        for name, entry in json.loads(proc.stdout or "{}").items():
            segment = name.rsplit("/", 1)[-1].split("-", 1)[0]
            if entry.get("type") == "file" and SEGMENT.match(segment):
                found[segment] = datetime.fromtimestamp(entry.get("time", 0), timezone.utc)
        return found


@dataclass
class RepoSpec:
    """A repository as pgBackRest's config lines and a name people recognise."""

    index: int
    store: str
    where: str
    options: dict[str, str]
    secret_options: dict[str, str]
    verify_tls: bool = True


@dataclass
class BackupSet:
    label: str
    type: str
    started: datetime
    stopped: datetime
    size: int  # the database's size
    repo_size: int  # what this set stored in the repository (after compression, deltas)
    wal_start: str
    wal_stop: str
    repo: int
    error: bool
    annotations: dict[str, str] = field(default_factory=dict)
    previous_wal_stop: str = ""  # set by `backup`: where the set before this one ended in the WAL

    @property
    def verified_at(self) -> str | None:
        return self.annotations.get("runbooks-verified")


@dataclass
class StanzaInfo:
    status: str
    backups: list[BackupSet]
    archives: dict[int, tuple[str, str, str]]  # repo -> (archive id, min WAL, max WAL)

    @staticmethod
    def parse(data: dict[str, Any]) -> "StanzaInfo":
        def ts(value: Any) -> datetime:
            return datetime.fromtimestamp(int(value or 0), timezone.utc)

        backups = [BackupSet(label=b["label"], type=b["type"], started=ts(b["timestamp"]["start"]),
                             stopped=ts(b["timestamp"]["stop"]), size=int(b["info"]["size"]),
                             repo_size=int(b["info"]["repository"].get("delta") or 0),
                             wal_start=b["archive"]["start"] or "", wal_stop=b["archive"]["stop"] or "",
                             repo=int(b["database"]["repo-key"]), error=bool(b.get("error")),
                             annotations=dict(b.get("annotation") or {}))
                   for b in data.get("backup", [])]
        archives = {int(a["database"]["repo-key"]): (a["id"], a.get("min") or "", a.get("max") or "")
                    for a in data.get("archive", []) if a.get("max")}
        return StanzaInfo(status=(data.get("status") or {}).get("message", "unknown"),
                          backups=sorted(backups, key=lambda b: b.stopped), archives=archives)

    def usable(self, repo: int) -> list[BackupSet]:
        return [b for b in self.backups if b.repo == repo and not b.error]


# --- configuration ------------------------------------------------------------------------


def stanza_of(name: str, cfg: PitrConfig, stores: dict[str, Any]) -> Stanza:
    """The database's stanza with its repositories resolved against the stores."""
    stanza = cfg.stanza or name
    if not STANZA.fullmatch(stanza):
        raise ConfigError(f"databases.{name}.pitr.stanza: {stanza!r} is not a valid stanza name")
    repos = [repo_spec(i, r, stores, stanza) for i, r in enumerate(cfg.repos, start=1)]
    conf = cfg.config_file or Path("/etc/pgbackrest") / f"{stanza}.conf"
    return Stanza(stanza, cfg, repos, conf)


def repo_spec(index: int, repo: PitrRepo, stores: dict[str, Any], stanza: str) -> RepoSpec:
    if repo.store not in stores:
        raise ConfigError(f"pitr.repos: no store named {repo.store!r} (configured: {', '.join(sorted(stores))})")
    st = stores[repo.store]
    p = f"repo{index}-"
    options = {f"{p}retention-full": str(repo.retention_full), f"{p}retention-diff": str(repo.retention_diff),
               f"{p}bundle": "y"}
    secrets: dict[str, str] = {}
    if repo.cipher_pass:
        options[f"{p}cipher-type"] = "aes-256-cbc"
        secrets[f"{p}cipher-pass"] = repo.cipher_pass.get_secret_value()
    if st.kind == "local":
        path = Path(st.path) / "pgbackrest"
        options[f"{p}path"] = str(path)
        return RepoSpec(index, repo.store, str(path), options, secrets)
    endpoint = urlsplit(st.endpoint_url or f"https://s3.{st.region}.amazonaws.com")
    if endpoint.scheme != "https":
        raise ConfigError(f"stores.{repo.store}.endpoint_url: pgBackRest speaks only HTTPS to S3 "
                          f"(got {endpoint.scheme}://)")
    prefix = "/" + "/".join(x for x in (st.prefix.strip("/"), "pgbackrest") if x)
    options |= {f"{p}type": "s3", f"{p}s3-bucket": st.bucket, f"{p}s3-region": st.region,
                f"{p}s3-endpoint": endpoint.hostname or "", f"{p}path": prefix,
                f"{p}s3-uri-style": "path" if st.endpoint_url else "host"}
    if endpoint.port:
        options[f"{p}storage-port"] = str(endpoint.port)
    if not repo.verify_tls:
        options[f"{p}storage-verify-tls"] = "n"
    if st.sse_kms_key_id:
        options[f"{p}s3-kms-key-id"] = st.sse_kms_key_id
    key = st.access_key_id.get_secret_value() if st.access_key_id else os.environ.get("AWS_ACCESS_KEY_ID")
    secret = (st.secret_access_key.get_secret_value() if st.secret_access_key
              else os.environ.get("AWS_SECRET_ACCESS_KEY"))
    if key and secret:
        secrets |= {f"{p}s3-key": key, f"{p}s3-key-secret": secret}
    else:
        options[f"{p}s3-key-type"] = "auto"  # the instance's IAM role
    return RepoSpec(index, repo.store, f"s3://{st.bucket}{prefix}", options, secrets, repo.verify_tls)


def render_conf(stanza: Stanza) -> str:
    """pgbackrest.conf for one stanza. It holds the repositories' secrets, so it is
    written readable by the cluster's user only."""
    cfg = stanza.cfg
    glob_opts = {"log-path": str(cfg.log_dir), "log-level-console": "warn", "log-level-file": "info",
                 "compress-type": "zst", "compress-level": str(cfg.compress_level),
                 "process-max": str(cfg.process_max), "start-fast": "y", "archive-async": "n",
                 "archive-timeout": "60", "delta": "y"}
    for repo in stanza.repos:
        glob_opts |= repo.options | repo.secret_options
    lines = ["# Written by `runbooks pitr setup`; changes here are overwritten.", "[global]"]
    lines += [f"{k}={v}" for k, v in glob_opts.items()]
    lines += ["", f"[{stanza.name}]", f"pg1-path={cfg.data_dir}", f"pg1-port={cfg.port}",
              f"pg1-socket-path={cfg.socket_dir}", ""]
    return "\n".join(lines)


def archive_command(stanza: Stanza) -> str:
    return f"pgbackrest --config={stanza.conf_path} --stanza={stanza.name} archive-push %p"


def write_conf(stanza: Stanza) -> bool:
    """Write pgbackrest.conf (mode 0600, the cluster's user); True when it changed."""
    text = render_conf(stanza)
    path = stanza.conf_path
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    if os.geteuid() == 0:
        os.chown(tmp, *_owner(stanza.cfg))
    tmp.replace(path)
    return True


# --- WAL segments ---------------------------------------------------------------------------


def segment_number(name: str) -> tuple[int, int]:
    """(timeline, position) of a WAL segment name, positions consecutive."""
    m = SEGMENT.match(name)
    if not m:
        raise PitrError(f"not a WAL segment name: {name!r}")
    tli, log, seg = (int(g, 16) for g in m.groups())
    return tli, log * SEGMENTS_PER_LOG + seg


def segment_name(timeline: int, position: int) -> str:
    return f"{timeline:08X}{position // SEGMENTS_PER_LOG:08X}{position % SEGMENTS_PER_LOG:08X}"


def first_gap(segments: dict[str, datetime], start: str, until: datetime | None) -> str | None:
    """The first segment missing on `start`'s timeline from `start` on, up to the first
    segment archived after `until` (None: to the newest). Later timelines are not followed."""
    tli, pos = segment_number(start)
    positions = {segment_number(s)[1]: at for s, at in segments.items() if segment_number(s)[0] == tli}
    newest = max(positions, default=-1)
    while pos <= newest:
        at = positions.get(pos)
        if at is None:
            return segment_name(tli, pos)
        if until is not None and at >= until:
            return None
        pos += 1
    return None


# --- clusters --------------------------------------------------------------------------------


def cluster_dsn(dsn: str, port: int, dbname: str | None = None) -> str:
    """The database's DSN pointed at another port (a restored cluster on the same host)."""
    params = {"port": str(port), "connect_timeout": "5", "application_name": "prefect-runbooks"}
    if dbname:
        params["dbname"] = dbname
    return make_conninfo(dsn, **params)


def free_port() -> int:
    """A port nothing is bound to now (the kernel's pick). Another process may take it
    before the cluster binds it: start_restored then tries another."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Restored:
    """A cluster restored into its own data directory and started on its own port."""

    data_dir: Path
    port: int
    log_file: Path
    log_from: int = 0  # where the current start's lines begin in log_file (each start appends)

    def dsn(self, base: str, dbname: str | None = None) -> str:
        return cluster_dsn(base, self.port, dbname)

    def last_fatal(self) -> str:
        return last_fatal(self.log_file, self.log_from)


def pg_ctl(cfg: PitrConfig, bin_dir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    argv = as_user(cfg, [str(bin_dir / "pg_ctl"), *args])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/")


RESTORED_CONF_MARK = "# Written by runbooks for a restored copy of a Debian cluster."


def debian_conf_dir(cfg: PitrConfig) -> Path | None:
    """Where a Debian cluster (pg_createcluster) keeps postgresql.conf: not in its data
    directory, so a restored copy needs a postgresql.conf of its own to start."""
    if cfg.control != "pg_ctlcluster" or not cfg.cluster or "/" not in cfg.cluster:
        return None
    return Path("/etc/postgresql") / cfg.cluster


def give_restored_conf(cfg: PitrConfig, data_dir: Path) -> bool:
    """A restored Debian cluster's postgresql.conf: production's settings (included),
    this directory as its data directory, no pid file of production's. True if written."""
    conf_dir = debian_conf_dir(cfg)
    if conf_dir is None or (data_dir / "postgresql.conf").exists():
        return False
    text = (f"{RESTORED_CONF_MARK}\ninclude '{conf_dir / 'postgresql.conf'}'\n"
            f"data_directory = '{data_dir}'\nexternal_pid_file = ''\n")
    path = data_dir / "postgresql.conf"
    path.write_text(text)
    if os.geteuid() == 0:
        os.chown(path, *_owner(cfg))
    return True


def drop_restored_conf(data_dir: Path) -> None:
    """Before the copy becomes production: pg_ctlcluster uses /etc/postgresql's file."""
    path = data_dir / "postgresql.conf"
    if path.is_file() and path.read_text().startswith(RESTORED_CONF_MARK):
        path.unlink()


def start_restored(cfg: PitrConfig, bin_dir: Path, restored: Restored, archive: bool) -> None:
    """Start a restored data directory on its own port. Without `archive` it archives
    nothing: a side or scratch cluster must not push WAL into production's archive."""
    give_restored_conf(cfg, restored.data_dir)
    if not restored.log_file.exists():  # made here: the parent may be root's
        restored.log_file.touch(mode=0o640)
        if os.geteuid() == 0:
            os.chown(restored.log_file, *_owner(cfg))
    for _ in range(3):
        opts = f"-p {restored.port}" + ("" if archive else " -c archive_mode=off")
        restored.log_from = restored.log_file.stat().st_size
        proc = pg_ctl(cfg, bin_dir, "start", "-w", "-t", "600", "-D", str(restored.data_dir),
                      "-l", str(restored.log_file), "-o", opts)
        if proc.returncode == 0 or "could not create any TCP/IP sockets" not in restored.last_fatal():
            break
        restored.port = free_port()  # taken meanwhile (another restore on this host): another one
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        fatal = restored.last_fatal() if restored.log_file.stat().st_size > restored.log_from else said[-1]
        raise _recovery_error(fatal)(f"restored cluster in {restored.data_dir} did not start: {fatal}")


def stop_cluster(cfg: PitrConfig, bin_dir: Path, data_dir: Path, mode: str = "fast") -> bool:
    """Stop the cluster running from `data_dir`; False when none was running."""
    if not (data_dir / "postmaster.pid").exists():
        return False
    proc = pg_ctl(cfg, bin_dir, "stop", "-w", "-t", "600", "-m", mode, "-D", str(data_dir))
    if proc.returncode != 0 and "not running" not in proc.stderr + proc.stdout:
        raise PitrError(f"pg_ctl stop of {data_dir} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.returncode == 0


def mark_for_archive(cfg: PitrConfig, bin_dir: Path, data_dir: Path) -> list[str]:
    """Queue a stopped, promoted cluster's new timeline for archiving. It was promoted
    with archiving off (a side cluster then), so PostgreSQL queued nothing, and without
    the history file in the archive a later recovery cannot follow the new timeline.
    Queued: the newest history file, any .partial segment, and the new timeline's
    segments before the one its shutdown checkpoint is in (that one is still being
    written; the files after it are recycled, not WAL, and must never be archived)."""
    proc = subprocess.run(as_user(cfg, [str(bin_dir / "pg_controldata"), "-D", str(data_dir)]),
                          capture_output=True, text=True, timeout=60, cwd="/")
    m = re.search(r"Latest checkpoint's REDO WAL file:\s+([0-9A-F]{24})", proc.stdout)
    if proc.returncode != 0 or not m:
        raise PitrError(f"pg_controldata {data_dir} failed: {(proc.stderr or proc.stdout).strip()}")
    current = m.group(1)
    wal = data_dir / "pg_wal"
    timeline = current[:8]
    names = [p.name for p in wal.iterdir() if p.is_file() and (
        p.name == f"{timeline}.history" or p.name.endswith(".partial")
        or (SEGMENT.match(p.name) and p.name.startswith(timeline) and p.name < current))]
    status = wal / "archive_status"
    queued = []
    for name in sorted(names):
        if (status / f"{name}.done").exists() or (status / f"{name}.ready").exists():
            continue
        ready = status / f"{name}.ready"
        ready.touch()
        if os.geteuid() == 0:
            os.chown(ready, *_owner(cfg))
        queued.append(name)
    return queued


def _recovery_error(fatal: str) -> type[PitrError]:
    return TargetNotReached if "recovery ended before configured recovery target" in fatal else PitrError


def drop_recovery_target(cfg: PitrConfig, data_dir: Path) -> None:
    """Remove the recovery target pgBackRest wrote, so the next start recovers to the
    end of the archive (the file keeps its owner: it is rewritten in place)."""
    auto = data_dir / "postgresql.auto.conf"
    lines = auto.read_text().splitlines(keepends=True)
    with open(auto, "w") as fh:
        fh.writelines(ln for ln in lines if not ln.lstrip().startswith("recovery_target"))


# What a client is told while the server starts or stops: logged as FATAL, never the cause.
_REFUSED_CLIENT = re.compile(r"the database system is (starting up|in recovery mode|shutting down|not "
                             r"(yet )?accepting connections)")


def last_fatal(log_file: Path, start: int = 0) -> str:
    """The server log's last FATAL or PANIC line from byte `start` on (one start's lines),
    for a cluster that died in recovery; a refused connection of ours is not the cause."""
    try:
        with open(log_file, "rb") as fh:
            fh.seek(start)
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return f"no server log at {log_file}"
    bad = [ln for ln in lines if re.search(r"\b(FATAL|PANIC):", ln) and not _REFUSED_CLIENT.search(ln)]
    picked = bad[-1] if bad else (lines[-1] if lines else "empty server log")
    return re.sub(r"^\S+ \S+ \S+ \[\d+\] ", "", picked).strip()


def wait_recovered(cfg: PitrConfig, restored: Restored, dsn: str, expect_paused: bool) -> dict[str, Any]:
    """Wait until recovery has stopped: paused at the target, or ended and promoted.
    Returns the cluster's state; a cluster that dies on the way raises with its log line."""
    deadline = time.monotonic() + cfg.recovery_timeout_seconds
    query = """SELECT pg_is_in_recovery(),
                      CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() ELSE '' END,
                      pg_last_xact_replay_timestamp(), pg_last_wal_replay_lsn()::text, timeline_id
               FROM pg_control_checkpoint()"""
    while True:
        if not (restored.data_dir / "postmaster.pid").exists():
            fatal = restored.last_fatal()
            raise _recovery_error(fatal)(f"restored cluster stopped during recovery: {fatal}")
        try:
            with psycopg.connect(restored.dsn(dsn, "postgres"), autocommit=True) as conn:
                in_recovery, pause, replayed, lsn, tli = conn.execute(query).fetchone()  # type: ignore[misc]
        except psycopg.OperationalError:  # not accepting connections yet
            in_recovery, pause, replayed, lsn, tli = True, "", None, None, None
        if not in_recovery or (expect_paused and pause == "paused"):
            return {"in_recovery": in_recovery, "paused": pause == "paused",
                    "last_replayed_xact": replayed, "replay_lsn": lsn, "timeline": tli}
        if time.monotonic() > deadline:
            raise PitrError(f"recovery did not finish in {cfg.recovery_timeout_seconds} s "
                            f"(server log: {restored.log_file})")
        time.sleep(0.5)


def archiver_status(dsn: str) -> dict[str, Any]:
    """pg_stat_archiver, and the archive lag: how many seconds of writes are not in the
    archive yet, the data a lost disk would take with it now. It is the age of the
    oldest segment waiting to be archived, or, when none waits but the current segment
    holds writes, the time since the last successful archive."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute(
            """SELECT archived_count, last_archived_wal, last_archived_time, failed_count,
                      last_failed_wal, last_failed_time,
                      (SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'),
                      (SELECT extract(epoch FROM now() - min(modification))
                         FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'),
                      CASE WHEN pg_walfile_name(pg_current_wal_insert_lsn()) > coalesce(last_archived_wal, '')
                           THEN extract(epoch FROM now() - last_archived_time) END,
                      current_setting('archive_mode'), current_setting('archive_command'),
                      current_setting('archive_timeout')
               FROM pg_stat_archiver""").fetchone()
    assert row is not None
    keys = ("archived_count", "last_archived_wal", "last_archived_time", "failed_count", "last_failed_wal",
            "last_failed_time", "ready", "oldest_ready_seconds", "unarchived_seconds", "archive_mode",
            "archive_command", "archive_timeout")
    status = dict(zip(keys, row))
    status["lag_seconds"] = max(float(status["oldest_ready_seconds"] or 0.0),
                                float(status["unarchived_seconds"] or 0.0))
    last_ok, last_bad = status["last_archived_time"], status["last_failed_time"]
    status["failing"] = last_bad is not None and (last_ok is None or last_bad > last_ok)
    return status


def archive_current_segment(dsn: str, timeout: float = 60) -> str | None:
    """Switch production to a new WAL segment and wait until the old one is archived:
    its name; None when production does not answer or archiving does not finish in time."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            segment = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]  # type: ignore[index]
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                last = conn.execute("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver").fetchone()
                if last and last[0] >= segment:
                    return str(segment)
                time.sleep(0.3)
    except psycopg.Error:
        return None
    return None


def wake_checkpointer(dsn: str) -> None:
    """A CHECKPOINT right after a start. PostgreSQL 15's checkpointer, started during
    recovery, sleeps a whole checkpoint_timeout before it first looks at archive_timeout:
    until then a quiet primary archives nothing (seen here: no switch for 5 minutes)."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=30) as conn:
        conn.execute("CHECKPOINT")


# --- set-up, backups, restores --------------------------------------------------------------

PG_SETTINGS = ("wal_level", "archive_mode", "archive_command", "archive_timeout")
RESTART_NEEDED = ("wal_level", "archive_mode")


def wanted_settings(stanza: Stanza) -> dict[str, str]:
    return {"wal_level": "replica", "archive_mode": "on", "archive_command": archive_command(stanza),
            "archive_timeout": f"{stanza.cfg.archive_timeout}s"}


def pending_settings(dsn: str, stanza: Stanza) -> dict[str, tuple[str, str]]:
    """The PostgreSQL settings PITR needs that differ: name -> (now, wanted).
    wal_level 'logical' already includes what 'replica' gives."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        now = {name: conn.execute("SELECT setting || coalesce(unit, '') FROM pg_settings WHERE name = %s",
                                  (name,)).fetchone()[0] for name in PG_SETTINGS}  # type: ignore[index]
    now["archive_timeout"] = _seconds(now["archive_timeout"])
    wanted = wanted_settings(stanza)
    wanted["archive_timeout"] = _seconds(wanted["archive_timeout"])
    return {k: (now[k], v) for k, v in wanted.items()
            if now[k] != v and not (k == "wal_level" and now[k] == "logical")}


def _seconds(value: str) -> str:
    m = re.fullmatch(r"(\d+)(ms|s|min|h)?", value)
    if not m:
        return value
    factor = {"ms": 0.001, "s": 1, "min": 60, "h": 3600, None: 1}[m.group(2)]
    return f"{int(int(m.group(1)) * factor)}s"


def apply_settings(dsn: str, stanza: Stanza, pending: dict[str, tuple[str, str]]) -> bool:
    """ALTER SYSTEM the pending settings and reload; True when a restart is needed."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        for name in pending:
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(
                sql.Identifier(name), sql.Literal(wanted_settings(stanza)[name])))
        conn.execute("SELECT pg_reload_conf()")
    return any(name in RESTART_NEEDED for name in pending)


def control_command(cfg: PitrConfig, action: Literal["start", "stop", "restart"], bin_dir: Path) -> list[str]:
    """How the production cluster is started, stopped or restarted."""
    if cfg.control == "pg_ctlcluster":
        if not cfg.cluster or "/" not in cfg.cluster:
            raise ConfigError("pitr.cluster: pg_ctlcluster needs VERSION/NAME, e.g. 15/main")
        version, name = cfg.cluster.split("/", 1)
        return ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, action]
    if cfg.control == "systemd":
        if not cfg.cluster:
            raise ConfigError("pitr.cluster: systemd needs the unit, e.g. postgresql@15-main")
        return ["systemctl", action, cfg.cluster]
    log = cfg.data_dir.parent / f"{cfg.data_dir.name}.log"
    args = {"start": ["start", "-w", "-t", "600", "-l", str(log)], "stop": ["stop", "-w", "-m", "fast"],
            "restart": ["restart", "-w", "-t", "600", "-m", "fast", "-l", str(log)]}[action]
    return as_user(cfg, [str(bin_dir / "pg_ctl"), *args, "-D", str(cfg.data_dir)])


def control(cfg: PitrConfig, action: Literal["start", "stop", "restart"], bin_dir: Path) -> None:
    argv = control_command(cfg, action, bin_dir)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd="/")
    if proc.returncode != 0:
        raise PitrError(f"{action} of the cluster in {cfg.data_dir} failed: "
                        f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no output']}")


def create_stanza(stanza: Stanza) -> None:
    """stanza-create is idempotent: an existing stanza with the same cluster is left as is."""
    for repo in stanza.repos:
        if repo.options.get(f"repo{repo.index}-type") is None:  # a local path: the user must own it
            make_owned_dir(stanza.cfg, Path(repo.where), 0o750)
    make_owned_dir(stanza.cfg, stanza.cfg.log_dir, 0o750)
    stanza.run("stanza-create", timeout=600)


def backup(stanza: Stanza, kind: Literal["full", "diff", "incr"], repo: int) -> BackupSet:
    """One pgBackRest backup into `repo`; returns the set it made (pgBackRest turns an
    incr or diff without a full before it into a full, and the set says so)."""
    before = {b.label for b in stanza.info(repo).backups}
    stanza.run(f"--type={kind}", "backup", repo=repo)
    after = stanza.info(repo)
    made = [b for b in after.backups if b.label not in before and b.repo == repo]
    if not made:
        raise PitrError(f"pgbackrest backup (stanza {stanza.name}, repo{repo}) finished but no new set is listed")
    previous = [b for b in after.usable(repo) if b.label in before]
    made[-1].previous_wal_stop = previous[-1].wal_stop if previous else ""
    return made[-1]


def annotate(stanza: Stanza, label: str, repo: int, **notes: str) -> None:
    stanza.run(f"--set={label}", *(f"--annotation={k}={v}" for k, v in notes.items()), "annotate", repo=repo)


class Target(BaseModel):
    """Where recovery stops: a second (with its zone), a named restore point, or the end
    of the archived WAL."""

    kind: Literal["time", "name", "latest"]
    time: datetime | None = None
    name: str | None = None

    @staticmethod
    def parse(target_time: str | None, restore_point: str | None) -> "Target":
        if target_time and restore_point:
            raise ConfigError("give a target time or a restore point, not both")
        if restore_point:
            if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,63}", restore_point):
                raise ConfigError(f"restore point {restore_point!r}: letters, digits, '_.:-', at most 63")
            return Target(kind="name", name=restore_point)
        if not target_time or target_time.strip().lower() == "latest":
            return Target(kind="latest")
        text = target_time.strip().replace(" UTC", "+00:00").replace("Z", "+00:00")
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise ConfigError(f"target time {target_time!r} is not an ISO 8601 time, e.g. "
                              "2026-12-07T01:18:10+00:00") from None
        if when.tzinfo is None:
            raise ConfigError(f"target time {target_time!r} has no zone; add one, e.g. +00:00 or Z")
        return Target(kind="time", time=when)

    def describe(self) -> str:
        if self.kind == "time" and self.time:
            return f"{self.time.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S.%f} UTC".replace(".000000", "")
        return f"restore point {self.name!r}" if self.kind == "name" else "the end of the archived WAL"

    def options(self) -> list[str]:
        if self.kind == "time" and self.time:
            return ["--type=time", f"--target={self.time.isoformat(sep=' ')}"]
        if self.kind == "name" and self.name:
            return ["--type=name", f"--target={self.name}"]
        return ["--type=default"]


@dataclass
class RestorePlan:
    target: Target
    backup: BackupSet
    repo: int
    newest_wal: str
    newest_wal_at: datetime
    segments_checked: int


def plan_restore(stanza: Stanza, target: Target, repo: int = 1, backup_set: str | None = None) -> RestorePlan:
    """Choose the backup set that really precedes the target and check the archive holds
    every WAL segment from it to the target. pgBackRest alone would take the newest set,
    even one that ended after the target (and then cannot go back)."""
    info = stanza.info(repo)
    usable = info.usable(repo)
    if not usable:
        raise TargetOutOfRange(f"stanza {stanza.name} has no usable backup in repo{repo}")
    if repo not in info.archives:
        raise TargetOutOfRange(f"stanza {stanza.name} has no archived WAL in repo{repo}")
    archive_id = info.archives[repo][0]
    segments = stanza.archived_segments(repo, archive_id)
    newest = max(segments, key=lambda s: segment_number(s))
    newest_at = segments[newest]
    oldest = usable[0]
    if backup_set is not None:
        chosen = next((b for b in usable if b.label == backup_set), None)
        if chosen is None:
            raise TargetOutOfRange(f"no usable backup set {backup_set!r} in repo{repo} "
                                   f"(sets: {', '.join(b.label for b in usable)})")
    elif target.kind == "time":
        assert target.time is not None
        before = [b for b in usable if b.stopped < target.time]
        if not before:
            raise TargetOutOfRange(
                f"target {target.describe()} is before the oldest backup {oldest.label}, "
                f"which ended {oldest.stopped:%Y-%m-%d %H:%M:%S} UTC; the newest archived WAL is "
                f"{newest} (archived {newest_at:%Y-%m-%d %H:%M:%S} UTC)")
        chosen = before[-1]
    elif target.kind == "name":
        chosen = oldest  # a restore point's time is unknown: replay from the oldest set reaches it
    else:
        chosen = usable[-1]
    # The repository keeps whole seconds: a segment archived at :47.9 is listed at :47.
    if target.kind == "time" and target.time is not None and target.time >= newest_at + timedelta(seconds=1):
        raise TargetOutOfRange(
            f"target {target.describe()} is after the newest archived WAL {newest} "
            f"(archived {newest_at:%Y-%m-%d %H:%M:%S} UTC); the oldest backup {oldest.label} "
            f"ended {oldest.stopped:%Y-%m-%d %H:%M:%S} UTC")
    until = target.time if target.kind == "time" else None
    gap = first_gap(segments, chosen.wal_start, until)
    if gap is not None:
        raise WalGap(f"WAL segment {gap} is missing from the archive (repo{repo}) between backup "
                     f"{chosen.label} and {target.describe()}: recovery cannot cross it; restore to "
                     "a time before it, or from a later backup set")
    checked = sum(1 for s in segments if segment_number(s) >= segment_number(chosen.wal_start))
    return RestorePlan(target, chosen, repo, newest, newest_at, checked)


def restore(stanza: Stanza, plan: RestorePlan, dest: Path, promote: bool) -> None:
    """pgBackRest restore of the planned set into the new directory `dest`; recovery
    settings go into its postgresql.auto.conf. A time or name target pauses there
    unless `promote`; the end of the archive always ends recovery (promotes)."""
    if dest.exists() and any(dest.iterdir()):
        raise PitrError(f"{dest} exists and is not empty; a restore never writes over a directory")
    if not dest.parent.exists():
        make_owned_dir(stanza.cfg, dest.parent, 0o755)
    make_owned_dir(stanza.cfg, dest, 0o700)  # made here: the parent may be root's (Debian's /var/lib/postgresql/15)
    options = [f"--pg1-path={dest}", f"--set={plan.backup.label}", *plan.target.options()]
    if plan.target.kind != "latest":
        options.append(f"--target-action={'promote' if promote else 'pause'}")
    stanza.run(*options, "restore", repo=plan.repo)


def setup(stanza: Stanza, dsn: str, bin_dir: Path, restart: bool) -> list[str]:
    """Write pgbackrest.conf, set what PostgreSQL needs, create the stanza and prove it
    with `pgbackrest check` (a WAL segment archived to every repository). Idempotent.
    A restart (wal_level, archive_mode) happens only when `restart`; without it the
    settings are stored and the caller is told to restart and run again."""
    done: list[str] = []
    if write_conf(stanza):
        done.append(f"wrote {stanza.conf_path} (mode 0600, owner {stanza.cfg.os_user})")
    pending = pending_settings(dsn, stanza)
    if pending:
        needs_restart = apply_settings(dsn, stanza, pending)
        done += [f"set {k}: {old!r} -> {new!r}" for k, (old, new) in pending.items()]
        if needs_restart and not restart:
            raise RestartNeeded(
                "; ".join(done) + ". wal_level and archive_mode take effect only after a restart of "
                f"the cluster in {stanza.cfg.data_dir}: run again with --restart, or restart it "
                "yourself and run setup again")
        if needs_restart:
            control(stanza.cfg, "restart", bin_dir)
            wake_checkpointer(dsn)
            done.append("restarted the cluster")
    create_stanza(stanza)
    stanza.run("check", timeout=600)
    done.append(f"stanza {stanza.name}: pgbackrest check archived a WAL segment to "
                + ", ".join(f"repo{r.index} ({r.where})" for r in stanza.repos))
    return done


class RestartNeeded(PitrError):
    """The settings are stored but take effect only after the cluster restarts."""
