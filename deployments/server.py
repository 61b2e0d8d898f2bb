"""Which Prefect server the `runbooks` commands talk to: PREFECT_API_URL when it is set,
or else a local `prefect server start` (API and UI) on 127.0.0.1:4200 that `runbooks
serve` starts and the other commands find there."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tasks.errors import RunbookError

LOCAL_HOST = "127.0.0.1"
LOCAL_PORT = 4200
START_SECONDS = 90


def local_api_url(port: int = LOCAL_PORT) -> str:
    return f"http://{LOCAL_HOST}:{port}/api"


def configured_api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value() or None


def healthy(api_url: str, timeout: float = 3.0) -> bool:
    try:
        return httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def configured_server() -> str | None:
    """PREFECT_API_URL when it is set (a clear error when nothing answers there), else None."""
    url = configured_api_url()
    if url and not healthy(url):
        raise RunbookError(f"no Prefect server answers at PREFECT_API_URL={url}")
    return url


def require_server() -> str:
    """The API URL the CLI's runs go to; a clear error when no server answers there."""
    url = configured_server()
    if url:
        return url
    url = local_api_url()
    if not healthy(url):
        raise RunbookError(f"no Prefect server at {url}: start one with `runbooks serve`, "
                           "or set PREFECT_API_URL to yours")
    return url


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((LOCAL_HOST, port)) == 0


@contextmanager
def local_server(port: int = LOCAL_PORT, log_path: Path | None = None) -> Iterator[str]:
    """Run `prefect server start` on loopback for the body; yields its API URL. Its
    output goes to a log file (PREFECT_HOME/server.log), not the terminal."""
    url = local_api_url(port)
    if _port_taken(port):
        hint = (f"a Prefect server already answers there: set PREFECT_API_URL={url} to use it"
                if healthy(url) else "something else listens there")
        raise RunbookError(f"port {port} on {LOCAL_HOST} is taken ({hint}), or pass --port")
    from prefect.settings import PREFECT_HOME

    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    log_path = log_path or home / "server.log"
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_API_URL": url,
           "PREFECT_SERVER_LOGGING_LEVEL": os.environ.get("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")}
    env.pop("PREFECT_API_URL", None)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([prefect, "server", "start", "--host", LOCAL_HOST, "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + START_SECONDS
        while not healthy(url, timeout=1):
            if proc.poll() is not None:
                raise RunbookError(f"the Prefect server exited ({proc.returncode}) while starting; "
                                   f"see {log_path}")
            if time.monotonic() > deadline:
                raise RunbookError(f"the Prefect server did not answer within {START_SECONDS}s; see {log_path}")
            time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
