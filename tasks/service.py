"""Service controllers: status, start, stop, restart, scale and recent logs of a target
service, behind one interface.

Backends:
  process   a local supervised process (start command, pid file, log file; SIGTERM to its
            process group, then SIGKILL after a grace period)
  systemd   systemctl and journalctl
  docker    the docker CLI
  kubernetes  the Kubernetes API: rollout restart by annotating the pod template as
            `kubectl rollout restart` does, scale through the scale subresource, pod logs
Commands are argument lists and every call has a timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
import subprocess
import time
from datetime import datetime, timezone
from abc import ABC, abstractmethod
from collections import deque
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from tasks.errors import RunbookError
from tasks.report import first_line
from tasks.prometheus import DEFAULT_ERROR_RATE_QUERY, DEFAULT_LATENCY_QUERY


# Reference runbook 1's success criterion "no new errors in logs": words that mark one.
DEFAULT_LOG_ERROR_PATTERN = r"(?i)\b(error|critical|fatal|panic|traceback)\b"


class ServiceError(RunbookError):
    """A controller could not do what was asked; the message names the service."""


SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")  # a pod's own credentials
ROLLOUT_POLL_SECONDS = 1.0  # between reads of a deployment's rollout


class ProcessControllerConfig(BaseModel):
    """`[services.<name>.controller] kind = "process"`."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["process"] = "process"
    command: list[str] = Field(min_length=1, description="argv of the service; no shell")
    workdir: Path | None = None
    env: dict[str, str] = Field(default_factory=dict)
    pid_file: Path
    log_file: Path
    grace_seconds: float = Field(30, gt=0, description="SIGTERM to SIGKILL")


class ServiceStatus(BaseModel):
    service: str
    running: bool
    replicas: int
    pid: int | None = None
    detail: str = ""


class Controller(ABC):
    """What every backend can do to a service."""

    name: str

    @abstractmethod
    def status(self) -> ServiceStatus:
        """Whether it runs, and how many replicas."""

    @abstractmethod
    def start(self) -> ServiceStatus:
        """Start it; a running service is left alone (idempotent)."""

    @abstractmethod
    def stop(self) -> ServiceStatus:
        """Stop it gracefully; a stopped service is left alone (idempotent)."""

    @abstractmethod
    def scale(self, replicas: int) -> ServiceStatus:
        """Run this many replicas."""

    @abstractmethod
    def logs(self, lines: int = 100, since: datetime | None = None) -> list[str]:
        """The last `lines` lines it wrote. With `since`: only what instances started at
        or after `since` wrote (a restart's new process, container or pods), so the
        old instance's last words are not counted against the new one."""

    def restart(self) -> ServiceStatus:
        self.stop()
        return self.start()

    def leftovers(self) -> list[str]:
        """What still runs of it after a stop (pods, processes); backends whose stop
        waits for the end have nothing left once status says so."""
        return []

    def wait_stopped(self, timeout: float) -> ServiceStatus:
        """Wait until nothing of it runs: no ready replica and nothing left over (what
        `kubectl wait --for=delete` waits for), or fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            left = [] if status.running else self.leftovers()
            if not status.running and not left:
                return status
            if time.monotonic() >= deadline:
                raise ServiceError(f"service '{self.name}' still runs {timeout:g}s after it was told to stop: "
                                   + (", ".join(left) if left else status.detail))
            time.sleep(0.5)


def _start_time(pid: int, reap: bool = True) -> str | None:
    """The kernel's start time of `pid` (tells a reused pid from ours), None if gone.
    A zombie is reaped unless `reap` is off (a Popen that will wait for its exit code)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # exited, not yet reaped
        if reap:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        return None
    return fields[19]


class _OneInstance(Controller):
    """Backends that run one instance: scale means start (1) or stop (0)."""

    def scale(self, replicas: int) -> ServiceStatus:
        if replicas not in (0, 1):
            raise ServiceError(f"service '{self.name}': this controller runs 0 or 1 instance, not {replicas}")
        return self.start() if replicas else self.stop()


class ProcessController(_OneInstance):
    def __init__(self, name: str, config: ProcessControllerConfig) -> None:
        self.name = name
        self.config = config

    def _pid_file(self) -> list[str]:
        """`<pid> <kernel start time> <log offset> <start, ISO>`, as written by start."""
        try:
            return self.config.pid_file.read_text().split()
        except OSError:
            return []

    def _pid(self) -> int | None:
        """The pid in the pid file, if that process still runs (and is the one we started)."""
        fields = self._pid_file()
        try:
            pid = int(fields[0])
        except (IndexError, ValueError):
            return None
        return pid if _start_time(pid) == fields[1] else None

    def status(self) -> ServiceStatus:
        pid = self._pid()
        return ServiceStatus(service=self.name, running=pid is not None, replicas=1 if pid else 0, pid=pid,
                             detail=f"pid {pid}" if pid else "not running")

    def start(self) -> ServiceStatus:
        if self._pid() is not None:
            return self.status()
        cfg = self.config
        cfg.log_file.parent.mkdir(parents=True, exist_ok=True)
        cfg.pid_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(cfg.log_file, "ab") as log:
                # The log has no timestamps: where this start's output begins tells it apart.
                offset, started_at = log.seek(0, os.SEEK_END), datetime.now(timezone.utc)
                proc = subprocess.Popen(cfg.command, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=cfg.workdir,
                                        env={**os.environ, **cfg.env}, start_new_session=True)
        except OSError as exc:
            raise ServiceError(f"service '{self.name}': cannot start {cfg.command[0]}: {exc.strerror}") from None
        started = _start_time(proc.pid, reap=False)
        if started is None:  # died at once: Popen reaps it and keeps its exit code
            proc.wait()
            raise ServiceError(f"service '{self.name}' exited at once (code {proc.returncode}): "
                               f"{' | '.join(self.logs(3)) or 'no output'}")
        cfg.pid_file.write_text(f"{proc.pid} {started} {offset} {started_at.isoformat()}\n")
        return self.status()

    def stop(self) -> ServiceStatus:
        pid = self._pid()
        if pid is not None:
            self._signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + self.config.grace_seconds
            while time.monotonic() < deadline and _start_time(pid) is not None:
                time.sleep(0.05)
            if _start_time(pid) is not None:
                self._signal(pid, signal.SIGKILL)
                while _start_time(pid) is not None:
                    time.sleep(0.05)
        self.config.pid_file.unlink(missing_ok=True)
        return self.status()

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pid, sig)  # the whole group: workers the service forked go too
        except ProcessLookupError:
            pass

    def logs(self, lines: int = 100, since: datetime | None = None) -> list[str]:
        offset = 0
        if since is not None:  # the output of the newest start, if it began since then
            fields = self._pid_file()
            if len(fields) < 4:  # not running (stopped), or started by an older version
                return []
            try:
                started_at, offset = datetime.fromisoformat(fields[3]), int(fields[2])
            except ValueError:
                raise ServiceError(f"service '{self.name}': {self.config.pid_file} is malformed") from None
            if started_at < since:
                return []
        try:
            with open(self.config.log_file, "rb") as f:
                f.seek(offset)
                tail = deque(f, maxlen=lines)
        except OSError as exc:
            if since is None:  # evidence only
                return []
            raise ServiceError(f"service '{self.name}': cannot read {self.config.log_file}: {exc.strerror}") from None
        return [line.decode(errors="replace").rstrip("\n") for line in tail]


class SystemdControllerConfig(BaseModel):
    """`[services.<name>.controller] kind = "systemd"`."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["systemd"] = "systemd"
    unit: str
    timeout_seconds: float = Field(120, gt=0)


class DockerControllerConfig(BaseModel):
    """`[services.<name>.controller] kind = "docker"`."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["docker"] = "docker"
    container: str
    grace_seconds: int = Field(30, gt=0, description="docker stop -t")
    timeout_seconds: float = Field(120, gt=0)


def _run(service: str, tool: str, args: list[str], timeout: float) -> str:
    """Run `tool args`; its stdout, or a ServiceError naming the service and what failed."""
    path = shutil.which(tool)
    if path is None:
        raise ServiceError(f"service '{service}': {tool} not found on this machine "
                           f"(its controller needs it)")
    try:
        proc = subprocess.run([path, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ServiceError(f"service '{service}': {tool} {' '.join(args)} took over {timeout:g}s") from None
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise ServiceError(f"service '{service}': {tool} {' '.join(args)} failed (exit {proc.returncode}): "
                           f"{said[0] if said else 'no message'}")
    return proc.stdout


class SystemdController(_OneInstance):
    def __init__(self, name: str, config: SystemdControllerConfig) -> None:
        self.name, self.config = name, config

    def _ctl(self, *args: str) -> str:
        return _run(self.name, "systemctl", list(args), self.config.timeout_seconds)

    def status(self) -> ServiceStatus:
        props = dict(line.split("=", 1) for line in
                     self._ctl("show", self.config.unit, "--property=ActiveState,SubState,MainPID").splitlines()
                     if "=" in line)
        running = props.get("ActiveState") == "active"
        pid = int(props.get("MainPID", "0") or 0) or None
        return ServiceStatus(service=self.name, running=running, replicas=int(running), pid=pid,
                             detail=f"{props.get('ActiveState', '?')} ({props.get('SubState', '?')})")

    def start(self) -> ServiceStatus:
        self._ctl("start", self.config.unit)
        return self.status()

    def stop(self) -> ServiceStatus:
        self._ctl("stop", self.config.unit)
        return self.status()

    def restart(self) -> ServiceStatus:
        self._ctl("restart", self.config.unit)
        return self.status()

    def logs(self, lines: int = 100, since: datetime | None = None) -> list[str]:
        which = ["-u", self.config.unit]
        if since is not None:  # this run of the unit only, not the stop of the one before
            invocation = self._ctl("show", self.config.unit, "--property=InvocationID", "--value").strip()
            which = [f"_SYSTEMD_INVOCATION_ID={invocation}"] if invocation else which
            which.append(f"--since=@{int(since.timestamp())}")
        args = [*which, "-n", str(lines), "--no-pager", "-o", "cat"]
        return _run(self.name, "journalctl", args, self.config.timeout_seconds).splitlines()


class DockerController(_OneInstance):
    def __init__(self, name: str, config: DockerControllerConfig) -> None:
        self.name, self.config = name, config

    def _docker(self, *args: str) -> str:
        return _run(self.name, "docker", list(args), self.config.timeout_seconds)

    def status(self) -> ServiceStatus:
        running, pid, state = self._docker(
            "inspect", "--format", "{{.State.Running}} {{.State.Pid}} {{.State.Status}}",
            self.config.container).split()
        up = running == "true"
        return ServiceStatus(service=self.name, running=up, replicas=int(up), pid=int(pid) or None, detail=state)

    def start(self) -> ServiceStatus:
        self._docker("start", self.config.container)
        return self.status()

    def stop(self) -> ServiceStatus:
        self._docker("stop", "--time", str(self.config.grace_seconds), self.config.container)
        return self.status()

    def restart(self) -> ServiceStatus:
        self._docker("restart", "--time", str(self.config.grace_seconds), self.config.container)
        return self.status()

    def logs(self, lines: int = 100, since: datetime | None = None) -> list[str]:
        path = shutil.which("docker")
        if path is None:
            raise ServiceError(f"service '{self.name}': docker not found on this machine (its controller needs it)")
        # docker logs writes the container's stderr to its own stderr: keep both, in order.
        window = []
        if since is not None:  # from the later of `since` and this container start: not the old stop
            started = self._docker("inspect", "--format", "{{.State.StartedAt}}", self.config.container).strip()
            try:
                since = max(since, datetime.fromisoformat(started))
            except ValueError:
                pass
            window = ["--since", f"{since.timestamp():.6f}"]
        try:
            proc = subprocess.run([path, "logs", "--tail", str(lines), *window, self.config.container],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=self.config.timeout_seconds)
        except subprocess.TimeoutExpired:
            raise ServiceError(f"service '{self.name}': docker logs took over "
                               f"{self.config.timeout_seconds:g}s") from None
        if proc.returncode != 0:
            raise ServiceError(f"service '{self.name}': docker logs failed (exit {proc.returncode}): "
                               f"{(proc.stdout.strip().splitlines() or ['no message'])[0]}")
        return proc.stdout.splitlines()


class KubernetesControllerConfig(BaseModel):
    """`[services.<name>.controller] kind = "kubernetes"`: one Deployment.

    Credentials are found as kubectl finds them: `api_url` (with `token`) if given; else,
    inside a pod, its service account; else the kubeconfig (`kubeconfig`, $KUBECONFIG or
    ~/.kube/config) at `context`, exec credential plugins (EKS, GKE) included."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["kubernetes"] = "kubernetes"
    api_url: str | None = Field(None, description="e.g. https://kubernetes.default.svc; empty: the pod's "
                                "service account, else the kubeconfig")
    token: SecretStr | None = Field(None, description="bearer token for api_url (a secret)")
    ca_file: Path | None = None
    kubeconfig: Path | None = Field(None, description="empty: $KUBECONFIG, else ~/.kube/config")
    context: str | None = Field(None, description="kubeconfig context; empty: its current-context")
    namespace: str | None = Field(None, description="empty: the context's or the pod's namespace, else default")
    deployment: str
    replicas: int = Field(3, ge=1, description="what `start` scales back to")
    timeout_seconds: float = Field(30, gt=0, description="one API call")
    rollout_timeout_seconds: float = Field(600, gt=0, description="how long a restart or a start may take "
                                           "to roll out (as `kubectl rollout status --timeout`)")


class _Credentials:
    """Where the API is and how to authenticate. The token is read again before each call
    when it can expire (an exec plugin's, a service account's); the kubernetes client
    refreshes it only once it has."""

    def __init__(self, name: str, config: KubernetesControllerConfig) -> None:
        self.namespace = config.namespace
        if config.api_url:
            self.host, self.verify = config.api_url, _tls(str(config.ca_file) if config.ca_file else None)
            token = config.token.get_secret_value() if config.token else ""
            self._auth = lambda: {"Authorization": f"Bearer {token}"} if token else {}
            return
        from kubernetes import client, config as kube
        from kubernetes.config.incluster_config import InClusterConfigLoader

        cfg = client.Configuration()
        try:
            if (os.environ.get("KUBERNETES_SERVICE_HOST") and (SERVICE_ACCOUNT / "token").is_file()
                    and config.kubeconfig is None and config.context is None):
                InClusterConfigLoader(token_filename=str(SERVICE_ACCOUNT / "token"),
                                      cert_filename=str(SERVICE_ACCOUNT / "ca.crt")).load_and_set(cfg)
                ns_file = SERVICE_ACCOUNT / "namespace"
                self.namespace = self.namespace or (ns_file.read_text().strip() if ns_file.is_file() else None)
            else:  # as kubectl: --kubeconfig, else $KUBECONFIG (a list of files), else ~/.kube/config
                path = str(config.kubeconfig or os.environ.get("KUBECONFIG") or Path("~/.kube/config").expanduser())
                kube.load_kube_config(config_file=path, context=config.context, client_configuration=cfg)
                contexts, active = kube.list_kube_config_contexts(config_file=path)
                chosen = next((c for c in contexts if c["name"] == config.context), None) if config.context else active
                self.namespace = self.namespace or ((chosen or {}).get("context") or {}).get("namespace")
        except (kube.ConfigException, OSError, ValueError, TypeError) as exc:
            raise ServiceError(f"service '{name}': no usable Kubernetes credentials: {_no_secrets(exc)}") from None
        self.host = cfg.host
        self.verify = _tls(cfg.ssl_ca_cert, (cfg.cert_file, cfg.key_file) if cfg.cert_file else None) \
            if cfg.verify_ssl else False

        def auth() -> dict[str, str]:
            if cfg.refresh_api_key_hook is not None:
                cfg.refresh_api_key_hook(cfg)
            key = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
            scheme, _, token = (key or "").partition(" ")
            return {"Authorization": f"{scheme.capitalize()} {token}"} if token else {}

        self._auth = auth

    def headers(self) -> dict[str, str]:
        return self._auth()


def _tls(ca_file: str | None, client_cert: tuple[str, str] | None = None) -> ssl.SSLContext:
    """Verify the API server against `ca_file` (else the system's CAs); present a client
    certificate where the kubeconfig has one."""
    context = ssl.create_default_context(cafile=ca_file)
    if client_cert:
        context.load_cert_chain(*client_cert)
    return context


def _no_secrets(exc: BaseException) -> str:
    return first_line(exc)[:300] if not isinstance(exc, OSError) else f"{exc.strerror}: {exc.filename}"


class KubernetesController(Controller):
    def __init__(self, name: str, config: KubernetesControllerConfig) -> None:
        self.name, self.config = name, config
        self.credentials = _Credentials(name, config)
        self.namespace = self.credentials.namespace or "default"
        self.client = httpx.Client(base_url=self.credentials.host.rstrip("/"), headers={"Accept": "application/json"},
                                   timeout=config.timeout_seconds, verify=self.credentials.verify)
        self.path = f"/apis/apps/v1/namespaces/{self.namespace}/deployments/{config.deployment}"
        self.what = f"deployment {self.namespace}/{config.deployment}"

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        what = self.what
        kwargs["headers"] = {**self.credentials.headers(), **kwargs.get("headers", {})}
        try:
            r = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceError(f"service '{self.name}': Kubernetes API unreachable: {type(exc).__name__}") from None
        if r.status_code in (401, 403):
            raise ServiceError(f"service '{self.name}': Kubernetes API refused {method} on {what} "
                               f"(HTTP {r.status_code}): the token lacks that permission")
        if r.status_code == 404:
            raise ServiceError(f"service '{self.name}': {what} not found (HTTP 404)")
        if r.status_code >= 400:
            raise ServiceError(f"service '{self.name}': Kubernetes API answered HTTP {r.status_code} "
                               f"to {method} on {what}")
        return r

    def status(self) -> ServiceStatus:
        d = self._call("GET", self.path).json()
        want = d.get("spec", {}).get("replicas", 0)
        ready = d.get("status", {}).get("readyReplicas", 0) or 0
        return ServiceStatus(service=self.name, running=ready > 0, replicas=ready,
                             detail=f"{ready}/{want} replicas ready")

    def scale(self, replicas: int) -> ServiceStatus:
        if replicas < 0:
            raise ServiceError(f"service '{self.name}': cannot scale to {replicas} replicas")
        self._call("PATCH", f"{self.path}/scale", json={"spec": {"replicas": replicas}},
                   headers={"Content-Type": "application/merge-patch+json"})
        return self.status()

    def start(self) -> ServiceStatus:
        """Scale back up and wait until the replicas are rolled out and available."""
        self.scale(self.config.replicas)
        return self.wait_rollout()

    def stop(self) -> ServiceStatus:
        return self.scale(0)

    def rollout_status(self) -> tuple[bool, str]:
        """`kubectl rollout status`'s verdict on the deployment: (done, what it waits for)."""
        d = self._call("GET", self.path).json()
        meta, spec, st = d.get("metadata") or {}, d.get("spec") or {}, d.get("status") or {}
        if meta.get("generation", 0) > st.get("observedGeneration", 0):
            return False, "waiting for the deployment spec update to be observed"
        if any(c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded"
               for c in st.get("conditions") or []):
            raise ServiceError(f"service '{self.name}': {self.what} exceeded its progress deadline")
        want, updated = spec.get("replicas", 1), st.get("updatedReplicas", 0)
        total, available = st.get("replicas", 0), st.get("availableReplicas", 0)
        if updated < want:
            return False, f"{updated} out of {want} new replicas have been updated"
        if total > updated:
            return False, f"{total - updated} old replicas are pending termination"
        if available < updated:
            return False, f"{available} of {updated} updated replicas are available"
        return True, "successfully rolled out"

    def wait_rollout(self) -> ServiceStatus:
        """Wait as `kubectl rollout status --timeout=<rollout_timeout_seconds>s` does."""
        timeout = self.config.rollout_timeout_seconds
        deadline = time.monotonic() + timeout
        while True:
            done, waiting = self.rollout_status()
            if done:
                return self.status()
            if time.monotonic() >= deadline:
                raise ServiceError(f"service '{self.name}': rollout of {self.what} not finished after "
                                   f"{timeout:g}s: {waiting}")
            time.sleep(ROLLOUT_POLL_SECONDS)

    def leftovers(self) -> list[str]:
        """The deployment's pods that still exist (terminating ones included)."""
        try:
            labels = self._call("GET", self.path).json()["spec"]["selector"]["matchLabels"]
            selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            pods = self._call("GET", f"/api/v1/namespaces/{self.namespace}/pods",
                              params={"labelSelector": selector}).json().get("items", [])
            return [f"pod {p['metadata']['name']}" for p in pods]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ServiceError(f"service '{self.name}': unexpected answer from the Kubernetes API "
                               "listing the deployment's pods") from None

    def restart(self) -> ServiceStatus:
        """What `kubectl rollout restart` does (a new pod template annotation), then wait
        for the rollout as `kubectl rollout status` does."""
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        patch = {"spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": stamp}}}}}
        self._call("PATCH", self.path, json=patch,
                   headers={"Content-Type": "application/strategic-merge-patch+json"})
        return self.wait_rollout()

    def logs(self, lines: int = 100, since: datetime | None = None) -> list[str]:
        try:
            labels = self._call("GET", self.path).json()["spec"]["selector"]["matchLabels"]
            selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            pods = self._call("GET", f"/api/v1/namespaces/{self.namespace}/pods",
                              params={"labelSelector": selector}).json().get("items", [])
            names = [p["metadata"]["name"] for p in pods if since is None or
                     datetime.fromisoformat(p["metadata"]["creationTimestamp"]) >= since.replace(microsecond=0)]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ServiceError(f"service '{self.name}': unexpected answer from the Kubernetes API "
                               "listing the deployment's pods") from None
        out: list[str] = []
        for pod_name in names:  # since: only the pods this restart created, not the old ones going away
            try:
                r = self.client.get(f"/api/v1/namespaces/{self.namespace}/pods/{pod_name}/log",
                                    params={"tailLines": lines}, headers=self.credentials.headers())
            except httpx.HTTPError as exc:
                raise ServiceError(f"service '{self.name}': Kubernetes API unreachable: "
                                   f"{type(exc).__name__}") from None
            if r.status_code in (401, 403):
                raise ServiceError(f"service '{self.name}': Kubernetes API refused the logs of pod {pod_name} "
                                   f"(HTTP {r.status_code}): the token lacks that permission")
            if r.status_code >= 400:  # a pod still starting, or gone meanwhile: say so, read the rest
                out.append(f"{pod_name}: (no logs: HTTP {r.status_code})")
                continue
            out += [f"{pod_name}: {line}" for line in r.text.splitlines()]
        return out


ControllerConfig = Annotated[Union[ProcessControllerConfig, SystemdControllerConfig, DockerControllerConfig,
                                   KubernetesControllerConfig], Field(discriminator="kind")]


class ServiceConfig(BaseModel):
    """`[services.<name>]`: a target service, how to reach it and how to control it."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(description="where /health, /ready and /live answer")
    controller: ControllerConfig
    database: str | None = Field(None, description="the [databases.<name>] it uses")
    probe_timeout: float = Field(2.0, gt=0)
    ready_deadline_seconds: float = Field(120, gt=0, description="restart -> ready")
    watch_seconds: float = Field(120, ge=0, description="how long /health must stay green after; the "
                                 "reference wants the error rate back to baseline within 2 minutes")
    prometheus_job: str | None = Field(None, description="its job label in Prometheus; default: its name")
    error_rate_query: str = Field(DEFAULT_ERROR_RATE_QUERY, description="PromQL for its share of failed "
                                  "requests (0..1); $job stands for its job")
    error_rate_threshold: float = Field(0.001, ge=0, le=1, description="0.1 %, the reference's error-rate "
                                        "SLO: above it the service is sick, and a restart must bring it under")
    latency_query: str = Field(DEFAULT_LATENCY_QUERY, description="PromQL for its P95 latency in seconds "
                               "(incident updates show it); $job stands for its job")

    log_error_pattern: str = Field(DEFAULT_LOG_ERROR_PATTERN, description="a regular expression: a line "
                                   "of its logs since a restart that matches is an error; empty: not checked")

    @field_validator("log_error_pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return pattern

    def error_rate_promql(self, name: str) -> str:
        return self.error_rate_query.replace("$job", self.prometheus_job or name)

    def latency_promql(self, name: str) -> str:
        return self.latency_query.replace("$job", self.prometheus_job or name)

    def error_lines(self, lines: list[str]) -> list[str]:
        """The lines that say something went wrong (none when the check is off)."""
        if not self.log_error_pattern:
            return []
        pattern = re.compile(self.log_error_pattern)
        return [line for line in lines if pattern.search(line)]


def open_controller(name: str, config: ServiceConfig) -> Controller:
    """The controller for a service's backend."""
    c = config.controller
    if isinstance(c, ProcessControllerConfig):
        return ProcessController(name, c)
    if isinstance(c, SystemdControllerConfig):
        return SystemdController(name, c)
    if isinstance(c, DockerControllerConfig):
        return DockerController(name, c)
    return KubernetesController(name, c)
