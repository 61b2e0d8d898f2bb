"""The product run the way users run it: a real `prefect server start` on loopback (its
own PREFECT_HOME, a free port), `runbooks serve`, `prefect deploy` and process workers
in subprocesses, the `runbooks` and `prefect` commands as a user types them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from deployments.environment import QUIET
from deployments.spec import PROJECT, read_specs
from tests.conftest import free_port, need, sample_database

BIN = Path(sys.executable).parent
MONITORING = PROJECT / "monitoring"
NAMES = {spec.name for spec in read_specs()}  # every deployment of prefect.yaml


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


@dataclass
class Proc:
    """A subprocess in its own process group, its output in a file."""

    popen: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        return self.popen.returncode


def spawn(args: list[str], env: dict[str, str], log: Path, cwd: Path = PROJECT) -> Proc:
    with open(log, "ab") as out:
        popen = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    return Proc(popen, log)


def run(args: list[str], env: dict[str, str], timeout: float = 180,
        cwd: Path = PROJECT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def base_env(home: Path, config: Path | None = None, api_url: str | None = None) -> dict[str, str]:
    """What a user's shell would hold: the venv's tools first, a Prefect home of its own."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "RUNBOOKS_", "PYTEST_"))}
    env.update({"PATH": f"{BIN}:{env.get('PATH', '')}", "PREFECT_HOME": str(home),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RUNBOOKS_HOME": str(PROJECT),
                "RUNBOOKS_RETRY_DELAY_SCALE": "0.01"})
    if config:
        env["RUNBOOKS_CONFIG"] = str(config)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


class _RetryingTransport(httpx.HTTPTransport):
    """Try a 503 again, as Prefect's own client does: a server on SQLite answers 503 for a
    moment while another writer holds the database."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for _ in range(20):
            response = super().handle_request(request)
            if response.status_code != 503:
                return response
            response.read()
            response.close()
            time.sleep(1)
        return response


def api_client(url: str, timeout: float = 30) -> httpx.Client:
    """An HTTP client of the Prefect API that behaves like Prefect's (503 tried again)."""
    return httpx.Client(base_url=url, timeout=timeout, transport=_RetryingTransport())


@dataclass
class Server:
    """A `prefect server start` of the test's own."""

    url: str
    home: Path
    port: int
    proc: Proc
    db_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    def api(self) -> httpx.Client:
        return api_client(self.url)

    def stop(self) -> None:
        self.proc.stop()

    def start(self) -> None:
        """(Re)start on the same port, home and database."""
        env = base_env(self.home)
        lease = "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"
        env[lease] = QUIET[lease]  # as every server runbooks starts, and the docs ask
        env["PREFECT_UI_API_URL"] = self.url  # the UI's own calls; it assumes port 4200 otherwise
        if self.db_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.db_url
        self.proc = spawn([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                           "--port", str(self.port)], env, self.home / "server.log")
        wait_for(lambda: _healthy(self.url) or self.proc.popen.poll() is not None, 90, "the Prefect server")
        assert self.proc.popen.poll() is None, self.proc.output()[-2000:]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_server(home: Path, db_url: str | None = None) -> Server:
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = Server(url=f"http://127.0.0.1:{port}/api", home=home, port=port,
                    proc=None, db_url=db_url)  # type: ignore[arg-type]
    server.start()
    return server


@pytest.fixture(scope="session")
def e2e_database(pg_admin: str) -> Iterator[str]:
    """A sample database for the e2e runs (the `orders` target)."""
    with sample_database(pg_admin, "rb_e2e") as dsn:
        yield dsn


def write_config(path: Path, dsn: str, store: Path) -> Path:
    path.write_text(f"""
[databases.orders]
dsn = "{dsn}"
store = "local"

[stores.local]
kind = "local"
path = "{store}"
""")
    return path


def alerts_section(token: str, route: str, deployment: str, incident_deployment: str | None = None) -> str:
    """An `[alerts]` section with one route: ServiceDown to `deployment`, service = job."""
    incident = f'incident_deployment = "{incident_deployment}"' if incident_deployment else ""
    return f"""
[alerts]
bearer_token = "{token}"
{incident}
[[alerts.routes]]
name = "{route}"
matchers = ['alertname = "ServiceDown"']
deployment = "{deployment}"
parameters = {{ service = "{{{{ labels.job }}}}" }}
"""


@pytest.fixture(scope="session")
def e2e_config(e2e_database: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e-config")
    return write_config(root / "runbooks.toml", e2e_database, root / "backups")


def deployments_by_name(client: httpx.Client) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in client.post("/deployments/filter", json={}).json()}


def flow_run(client: httpx.Client, run_id: str) -> dict[str, Any]:
    return client.get(f"/flow_runs/{run_id}").json()


def wait_for_approval(client: httpx.Client, run_id: str, timeout: float, what: str) -> dict[str, Any]:
    """Wait until the run is paused *and* its approval form is stored.

    Prefect stores the form's schema just after the PAUSED state, and a resume in between is
    refused with "Run input schema not found", so PAUSED alone is not yet "waiting for approval".
    """
    def waiting() -> dict[str, Any] | None:
        run = flow_run(client, run_id)
        if run.get("state_type") != "PAUSED":
            return None
        details = (run.get("state") or {}).get("state_details") or {}
        schema = (details.get("run_input_keyset") or {}).get("schema")
        return run if schema and client.get(f"/flow_runs/{run_id}/input/{schema}").status_code == 200 else None

    return wait_for(waiting, timeout, what)


def wait_final(client: httpx.Client, run_id: str, timeout: float = 120) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        run = flow_run(client, run_id)
        return run if run.get("state_type") in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    return wait_for(final, timeout, f"flow run {run_id} to end")


@pytest.fixture(scope="session")
def served(e2e_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`runbooks serve` as a user starts it on one host: no PREFECT_API_URL, so it starts
    its own Prefect server (UI included) and prints the address."""
    root = tmp_path_factory.mktemp("served")
    port = free_port()
    env = base_env(root / "prefect-home", e2e_config)
    proc = spawn([str(BIN / "runbooks"), "serve", "--port", str(port)], env, root / "serve.log", cwd=root)
    url = f"http://127.0.0.1:{port}/api"
    wait_for(lambda: "Serving " in proc.output() or proc.popen.poll() is not None, 120, "runbooks serve")
    assert proc.popen.poll() is None, proc.output()

    def registered() -> bool:
        with api_client(url, timeout=10) as client:
            names = set(deployments_by_name(client))
        return names >= NAMES

    wait_for(registered, 60, "runbooks serve to register the deployments")
    started = time.monotonic()
    yield {"url": url, "ui": f"http://127.0.0.1:{port}", "env": {**env, "PREFECT_API_URL": url},
           "proc": proc, "root": root, "started": started}
    code = proc.stop()
    out = proc.output()
    assert code == 0, out[-3000:]
    assert "was never awaited" not in out and "Traceback" not in out, out[-3000:]


# --- the alert path: Prometheus, Alertmanager, `runbooks serve` with its receiver --------


def _binary(name: str) -> str:
    path = shutil.which(name)
    need(path is not None, f"{name} is not installed (Debian: prometheus, prometheus-alertmanager)")
    return str(path)


def ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _rules_overlay(path: Path) -> Path:
    """The repository's rules with `for:` cut to 2 s, as a test cannot wait a minute."""
    rules = yaml.safe_load((MONITORING / "rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "2s"
    path.write_text(yaml.safe_dump(rules))
    return path


def _alertmanager_overlay(path: Path, receiver_url: str, token_file: Path) -> Path:
    config = yaml.safe_load((MONITORING / "alertmanager.yml").read_text())
    config["route"].update(group_wait="1s", group_interval="2s", repeat_interval="2s")
    for sub in config["route"].get("routes", []):
        sub["group_wait"] = "1s"
    hook = config["receivers"][0]["webhook_configs"][0]
    hook["url"] = receiver_url
    hook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class AlertPorts:
    prometheus: int = field(default_factory=free_port)
    alertmanager: int = field(default_factory=free_port)
    receiver: int = field(default_factory=free_port)


def alert_sections(slack_url: str, ports: AlertPorts) -> str:
    """[prometheus], [notify] (Slack's stand-in) and [incidents] for an alert drill."""
    return f"""
[prometheus]
url = "http://127.0.0.1:{ports.prometheus}"

[notify]
slack_token = "xoxb-e2e-token"
slack_api_url = "{slack_url}"
slack_signing_secret = "e2e-signing-secret"

[incidents]
on_call = ["UONCALL"]
poll_seconds = 0.5
"""


@contextmanager
def alert_stack(root: Path, config: Path, api_port: int, token: str, ports: AlertPorts,
                deployments: list[str]) -> Iterator[dict[str, Any]]:
    """A Prefect server; the demo service (`[services.api]` of `config`) started by its
    controller; `runbooks serve` with its receiver; Alertmanager posting to it with the
    repository's config; Prometheus scraping the service as job "api" with the
    repository's rules (waits made short). Everything stopped afterwards."""
    prometheus, alertmanager = _binary("prometheus"), _binary("prometheus-alertmanager")
    procs: list[Proc] = []
    server = start_server(root / "prefect-home")
    env = base_env(root / "client", config, server.url)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        env.pop(name, None)  # slack_sdk would send loopback through a proxy
    controller = "from tasks.config import load_settings; load_settings().controller('api')"
    try:
        subprocess.run([sys.executable, "-c", f"{controller}.start()"], env=env, check=True, timeout=60)
        wait_for(lambda: ready(f"http://127.0.0.1:{api_port}/ready"), 30, "the demo service")
        serve = spawn([str(BIN / "runbooks"), "serve", "--receiver-port", str(ports.receiver)], env,
                      root / "serve.log", cwd=root)
        procs.append(serve)
        token_file = root / "token"
        token_file.write_text(token)
        am_config = _alertmanager_overlay(root / "alertmanager.yml", f"http://127.0.0.1:{ports.receiver}/alerts",
                                          token_file)
        procs.append(spawn([alertmanager, f"--config.file={am_config}", f"--storage.path={root / 'am'}",
                            f"--web.listen-address=127.0.0.1:{ports.alertmanager}", "--cluster.listen-address=",
                            "--log.level=warn"], env, root / "alertmanager.log", cwd=root))
        prom_config = root / "prometheus.yml"
        prom_config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(_rules_overlay(root / "rules.yml"))],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{ports.alertmanager}"]}]}]},
            "scrape_configs": [{"job_name": "api", "static_configs": [{"targets": [f"127.0.0.1:{api_port}"]}]}],
        }))
        procs.append(spawn([prometheus, f"--config.file={prom_config}", f"--storage.tsdb.path={root / 'tsdb'}",
                            f"--web.listen-address=127.0.0.1:{ports.prometheus}", "--log.level=warn"],
                           env, root / "prometheus.log", cwd=root))
        wait_for(lambda: ready(f"http://127.0.0.1:{ports.alertmanager}/-/ready"), 30, "alertmanager")
        wait_for(lambda: ready(f"http://127.0.0.1:{ports.prometheus}/-/ready"), 30, "prometheus")
        wait_for(lambda: "Serving " in serve.output(), 90, "runbooks serve")
        wait_for(lambda: ready(f"http://127.0.0.1:{ports.receiver}/healthz"), 30, "the receiver in serve")

        def registered() -> bool:
            with server.api() as client:
                return all(client.get(f"/deployments/name/{name}").status_code == 200 for name in deployments)

        wait_for(registered, 60, "the deployments")
        yield {"server": server, "env": env, "root": root, "api": f"http://127.0.0.1:{api_port}",
               "prometheus": f"http://127.0.0.1:{ports.prometheus}", "receiver": f"http://127.0.0.1:{ports.receiver}",
               "serve": serve, "ui": server.url.removesuffix("/api")}
    finally:
        for proc in reversed(procs):
            proc.stop()
        subprocess.run([sys.executable, "-c", f"{controller}.stop()"], env=base_env(root / "client", config),
                       timeout=60)
        server.stop()


# --- the Prefect UI in a real browser (Debian's chromium driven by playwright) ----------

SHOTS = PROJECT / "test-output" / "ui"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the networking flags chromium keeps dialling hosts this machine cannot reach.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update"]


@pytest.fixture(scope="module")
def page() -> Iterator:
    need(shutil.which("chromium") is not None, "chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def custom_run_form(page, served: dict[str, Any], deployment: str) -> None:
    """The deployment's page (found in the list the way a person does), then Run > Custom
    run. A failure leaves a screenshot of where it stopped in test-output/ui/."""
    try:
        page.goto(f"{served['ui']}/deployments")
        page.get_by_placeholder("Search deployments").fill(deployment)
        page.get_by_role("link", name=deployment, exact=True).first.click()  # (then its flow's link)
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run").click()
        page.get_by_text("Parameters", exact=True).wait_for()
        page.wait_for_load_state("networkidle")
    except Exception:
        page.screenshot(path=str(SHOTS / f"failed-run-form-{deployment}.png"), full_page=True)
        raise


def submit_form(page, attempts: int = 3) -> None:
    """Submit the run form; when the UI says "Something went wrong" and stays on the form
    (the SQLite-backed server answered 503 while busy), submit again, as a person would."""
    for attempt in range(attempts):
        page.get_by_role("button", name="Submit").click()
        try:
            page.wait_for_url(lambda url: not url.split("?")[0].endswith("/run"), timeout=15_000)
            return
        except Exception:
            if attempt == attempts - 1 or page.get_by_text("Something went wrong").count() == 0:
                raise


def submit_dialog(form, attempts: int = 3) -> None:
    """Submit the Resume dialog; when it stays open (the SQLite-backed server answered
    503 while busy, and the UI keeps the form), submit again, as a person would."""
    for attempt in range(attempts):
        form.get_by_role("button", name="Submit").click()
        try:
            form.wait_for(state="hidden", timeout=15_000)
            return
        except Exception:
            if attempt == attempts - 1:
                raise


def choose(page, index: int, option: str) -> None:
    """Pick `option` in the form's index-th dropdown (it opens from the keyboard)."""
    page.locator(".p-select-button__control").nth(index).focus()
    page.keyboard.press("ArrowDown")
    page.locator(".p-select-option", has_text=option).first.click()


