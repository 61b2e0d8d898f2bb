"""`runbooks serve`: every deployment of prefect.yaml served from this process, with
all of its settings: schedules fire here and runs started from the UI, `runbooks run`
or the REST API execute here. prefect.yaml stays the one list of deployments."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from contextlib import ExitStack

from deployments.server import configured_server, local_server
from deployments.spec import build_deployments, dormant_reason, read_specs
from tasks.errors import ConfigError

POLL_SECONDS = 1.0  # Prefect's runner default is 10 s: a run would wait that long to start


def configured_settings():  # type: ignore[no-untyped-def]
    """runbooks.toml, or None where there is none; a broken one stops us (never served)."""
    from tasks.config import config_path, load_settings

    return load_settings() if config_path().is_file() else None


def configured_targets(settings) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    """Target names for the forms' dropdowns; no config means plain fields."""
    if settings is None:
        return {}
    return {"databases": list(settings.databases), "services": list(settings.services),
            "stores": list(settings.stores), "pitr": [n for n, db in settings.databases.items() if db.pitr]}


class _Stopped(BaseException):
    """SIGTERM before the runner took over its handling (e.g. while the server starts)."""


_stop_requested = threading.Event()  # a SIGTERM arrived; survives a lost _Stopped


def _stop(*_: object) -> None:
    _stop_requested.set()
    raise _Stopped()


def serve_all(port: int, poll_seconds: float = POLL_SECONDS, say=print, receiver: bool | None = None,
              receiver_host: str = "127.0.0.1", receiver_port: int = 9095) -> None:
    """Validate prefect.yaml, connect to (or start) the Prefect server, serve until stopped
    (SIGTERM or Ctrl-C); the local server it started stops with it. The alert receiver
    runs beside the deployments when `receiver` (default: when [alerts] is configured)."""
    _stop_requested.clear()
    signal.signal(signal.SIGTERM, _stop)
    try:
        _serve(port, poll_seconds, say, receiver, receiver_host, receiver_port)
    except (_Stopped, KeyboardInterrupt):
        say("runbooks serve stopped")


def _serve(port: int, poll_seconds: float, say, receiver: bool | None, receiver_host: str,
           receiver_port: int) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if poll_seconds <= 0:
        raise ConfigError("--poll-seconds must be more than 0")
    settings = configured_settings()
    if receiver is None:
        receiver = settings is not None and settings.alerts is not None
    elif receiver and (settings is None or settings.alerts is None):
        raise ConfigError("--receiver needs an [alerts] section in runbooks.toml (see docs/alerts.md)")
    specs, targets = read_specs(), configured_targets(settings)
    deployments = build_deployments(specs, targets)  # before any server
    dormant = {s.name: why for s in specs if (why := dormant_reason(s, targets))}
    with ExitStack() as stack:
        url = configured_server()
        if url:
            say(f"Prefect server: {url} (PREFECT_API_URL)")
        else:
            url = stack.enter_context(local_server(port))
            say(f"Prefect server started: UI at {url.removesuffix('/api')}  (API {url}; "
                f"for other shells: export PREFECT_API_URL={url})")
        os.environ["PREFECT_API_URL"] = url  # the runs this process starts inherit it
        stack.enter_context(temporary_settings({PREFECT_API_URL: url}))
        if receiver:
            from deployments.receiver import receiver_beside

            stack.enter_context(receiver_beside(settings, url, receiver_host, receiver_port, say))
        say(f"Serving {len(deployments)} deployments: "
            + ", ".join(d.name for d in deployments) + f" (polling every {poll_seconds:g} s)")
        if dormant:
            say(f"Schedules inactive: {', '.join(sorted(dormant))} ({next(iter(dormant.values()))}; "
                "set it up as docs/pitr.md says and restart serve)")
        try:
            _run(deployments, poll_seconds)
        except (_Stopped, SystemExit):  # SIGTERM before the runner took it over
            _pause(deployments)  # as its own stop would
        say("runbooks serve stopped; its deployments are paused until it serves them again")


def _run(deployments: list, poll_seconds: float) -> None:
    """What `prefect.serve` does, with a SIGTERM that is never lost.

    Prefect's runner answers a SIGTERM that arrives while it is still starting with
    `sys.exit(0)` from the signal handler; that SystemExit lands in whatever frame runs,
    and inside a `__del__` Python prints it and drops it, so serve ran on. Here the
    handler only records the request; a watcher stops the runner once it has started.
    """
    from prefect.runner import Runner

    class _Runner(Runner):
        def handle_sigterm(self, *args: object, **kwargs: object) -> None:
            self._logger.info("SIGTERM received, initiating graceful shutdown...")
            _stop_requested.set()

    runner = _Runner(pause_on_shutdown=True, query_seconds=poll_seconds)
    for deployment in deployments:
        runner.add_deployment(deployment)
    done = threading.Event()

    def stop_when_asked() -> None:
        while not _stop_requested.wait(0.2):
            if done.is_set():
                return
        while not (runner.started and runner._loop is not None):
            if done.wait(0.05):
                return
        if not runner.stopping:
            runner.stopping = True
            runner.execute_in_background(runner.astop)

    threading.Thread(target=stop_when_asked, name="runbooks-serve-stop", daemon=True).start()
    try:
        asyncio.run(runner.start())
    finally:
        done.set()


def _pause(deployments: list) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for d in deployments:
            try:
                client.pause_deployment(client.read_deployment_by_name(f"{d.flow_name}/{d.name}").id)
            except ObjectNotFound:
                pass  # not registered yet
