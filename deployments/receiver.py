"""`runbooks receiver`: the HTTP endpoint Alertmanager posts to. Each firing alert that a
route matches becomes exactly one incident: a run of the incident deployment, which runs
the route's runbook. A resolved alert is handed to its incident's run.

Answers, and why (Alertmanager retries 5xx and never 4xx):
  401  no or wrong credentials        413  a body over `max_body_bytes`
  422  not JSON, not payload version 4, or an alert without a fingerprint
  503  Prefect could not take the run (unreachable, or answering 5xx): retry
  500  our own fault (the incident deployment does not exist, or refuses the
       parameters); retried too, so a fixed config picks the alert up
  200  every routed alert has its incident (new or the one it already had)
Nothing of a rejected request reaches a runbook.

It also takes Slack's button clicks (`/slack/interactions`, signed with the Slack app's
signing secret): "Acknowledge" on an incident's declaration.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import signal
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import parse_qs, quote

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import SecretStr, ValidationError

from deployments.health_metrics import RunbookHealth
from deployments.pitr_metrics import PitrHealth
from tasks import incidents
from tasks.alerts import AlertsConfig, Routed, WebhookPayload, route

log = logging.getLogger("runbooks.receiver")
ENDPOINT = "/alerts"
SLACK_ENDPOINT = "/slack/interactions"
SLACK_MAX_SKEW_SECONDS = 300  # Slack's advice: refuse older signatures (replays)
HEALTH_READ_SECONDS = 5.0  # a scrape waits this long at most for Prefect's run record


class HandOverError(Exception):
    """A run could not be created; `status` is what Alertmanager is told."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("runbooks_alerts_received", "Alerts received, by status", ["status"], registry=r)
        self.routed = Counter("runbooks_alerts_routed", "Alerts matched to a route", ["route"], registry=r)
        self.deduplicated = Counter("runbooks_alerts_deduplicated",
                                    "Alerts whose run already existed (re-delivery, repeat, other replica)",
                                    registry=r)
        self.unmatched = Counter("runbooks_alerts_unmatched", "Firing alerts no route matched", registry=r)
        self.rejected = Counter("runbooks_alerts_rejected", "Requests refused, by reason", ["reason"], registry=r)
        self.runs = Counter("runbooks_runs_created", "Incident runs created, by the runbook they run",
                            ["deployment"], registry=r)
        self.resolved = Counter("runbooks_alerts_resolutions", "Resolved alerts, by what became of them "
                                "(incident_updated, repeat, no_incident)", ["outcome"], registry=r)
        self.acks = Counter("runbooks_slack_acknowledgements", "Slack button clicks, by outcome",
                            ["outcome"], registry=r)
        self.handover = Histogram("runbooks_handover_seconds", "Request received to its runs created",
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=r)


class Handover:
    """Creates the runs through Prefect's API. The idempotency key makes the server return
    the run an alert already has (HTTP 200 instead of 201): that is the guarantee, across
    restarts and replicas. In front of it, so a storm of repeats does not become a storm
    of API calls: requests for a key in flight share one call, a key handed over recently
    is answered from memory, and at most PARALLEL calls go to Prefect at once (a busy
    SQLite-backed server answers 503, which is tried again, briefly)."""

    PARALLEL = 4  # SQLite takes one write at a time: more only queue inside the server
    REMEMBER_SECONDS = 300.0
    REMEMBER_KEYS = 10_000
    RETRIES = (0.1, 0.2, 0.4, 0.8, 1.6)  # seconds (with jitter) before each new try of a 503 or refused connection

    def __init__(self, client: httpx.AsyncClient, incident_deployment: str) -> None:
        self.client = client
        self.incident_deployment = incident_deployment
        self._deployments: dict[str, str] = {}
        self._inflight: dict[str, asyncio.Future[tuple[str, bool]]] = {}
        self._recent: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._slots = asyncio.Semaphore(self.PARALLEL)

    async def run_for(self, routed: Routed) -> tuple[str, bool]:
        """(flow run id, created now?) for the routed alert."""
        key = routed.idempotency_key
        known = self._recent.get(key)
        if known is not None and known[1] > time.monotonic():
            return known[0], False
        if key in self._inflight:
            run_id, _ = await asyncio.shield(self._inflight[key])
            return run_id, False
        future: asyncio.Future[tuple[str, bool]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            async with self._slots:
                result = await self._create(routed)
            self._remember(key, result[0])
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: a waiter re-raises it, none need exist
            raise
        finally:
            del self._inflight[key]

    def _remember(self, key: str, run_id: str) -> None:
        self._recent[key] = (run_id, time.monotonic() + self.REMEMBER_SECONDS)
        self._recent.move_to_end(key)
        while len(self._recent) > self.REMEMBER_KEYS:
            self._recent.popitem(last=False)

    async def _deployment_id(self, name: str) -> str:
        if name not in self._deployments:
            flow, deployment = (quote(part, safe="") for part in name.split("/", 1))
            response = await self._call("GET", f"deployments/name/{flow}/{deployment}")
            if response.status_code == 404:
                raise HandOverError(500, f"no deployment {name!r} on the Prefect server (is `runbooks serve` "
                                         "or `prefect deploy --all` running with this prefect.yaml?)")
            self._check(response, name)
            self._deployments[name] = response.json()["id"]
        return self._deployments[name]

    async def _create(self, routed: Routed) -> tuple[str, bool]:
        deployment_id = await self._deployment_id(self.incident_deployment)
        alert = routed.alert
        body = {"parameters": routed.incident_parameters(), "idempotency_key": routed.idempotency_key,
                "tags": ["alert", f"route:{routed.route}", f"severity:{routed.severity.value.lower()}"],
                "name": f"alert-{alert.labels.get('alertname', 'alert')[:40]}-{alert.fingerprint[:12]}".lower()}
        response = await self._call("POST", f"deployments/{deployment_id}/create_flow_run", json=body)
        if response.status_code == 404:
            self._deployments.pop(self.incident_deployment, None)  # deleted since: look it up again next time
            raise HandOverError(500, f"deployment {self.incident_deployment!r} is gone from the Prefect server")
        self._check(response, self.incident_deployment)
        return response.json()["id"], response.status_code == 201

    async def resolve(self, routed: Routed) -> str:
        """Tell the alert's incident run that the alert resolved: incident_updated, repeat
        (it was told before) or no_incident (the alert never had one)."""
        memo = "resolved:" + routed.idempotency_key
        known = self._recent.get(memo)
        if known is not None and known[1] > time.monotonic():
            return "repeat"
        deployment_id = await self._deployment_id(self.incident_deployment)
        response = await self._call("POST", "flow_runs/filter", json={
            "flow_runs": {"idempotency_key": {"any_": [routed.idempotency_key]}},
            "deployments": {"id": {"any_": [deployment_id]}}, "limit": 1})
        self._check(response, self.incident_deployment)
        if not response.json():
            return "no_incident"
        run_id = response.json()[0]["id"]
        alert = routed.alert
        value = {"fingerprint": alert.fingerprint, "endsAt": alert.endsAt.isoformat() if alert.endsAt else None}
        told = await self._tell_run(run_id, incidents.ALERT_RESOLVED, value, "runbooks-receiver")
        self._remember(memo, run_id)
        return "incident_updated" if told else "repeat"

    async def acknowledge(self, incident_id: str, by: str) -> str:
        """Acknowledge an incident for a Slack click: acknowledged, already, or unknown."""
        response = await self._call("GET", f"variables/name/{incidents.record_name(incident_id)}")
        if response.status_code == 404:
            return "unknown"
        self._check(response, "variables")
        run_id = (response.json().get("value") or {}).get("flow_run_id")
        if not run_id:
            return "unknown"
        told = await self._tell_run(run_id, incidents.ACK, {"by": by, "via": "slack"}, "slack")
        return "acknowledged" if told else "already"

    async def _tell_run(self, run_id: str, key: str, value: dict[str, Any], sender: str) -> bool:
        """A flow-run input for an incident's run (as tasks.incidents.tell, over this
        client); False when the run was told that already (HTTP 409)."""
        response = await self._call("POST", f"flow_runs/{run_id}/input", json={
            "key": key, "value": json.dumps(value), "sender": sender})
        if response.status_code == 409:
            return False
        self._check(response, self.incident_deployment)
        return True

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for pause in self.RETRIES:
            try:
                response = await self.client.request(method, path, **kwargs)
                if response.status_code != 503:
                    return response
            except httpx.HTTPError:
                pass
            await asyncio.sleep(pause * random.uniform(0.5, 1.5))  # retries of a burst must not collide again
        try:
            return await self.client.request(method, path, **kwargs)  # the last try: its 503 is checked by the caller
        except httpx.HTTPError as exc:
            raise HandOverError(503, f"Prefect is unreachable ({type(exc).__name__})") from None

    @staticmethod
    def _check(response: httpx.Response, deployment: str) -> None:
        if response.status_code >= 500:
            raise HandOverError(503, f"Prefect answered {response.status_code}")
        if response.status_code >= 400:
            detail = response.text[:300].replace("\n", " ")
            raise HandOverError(500, f"Prefect refused the run of {deployment!r} "
                                     f"(HTTP {response.status_code}): {detail}")


def _authorized(config: AlertsConfig, header: str) -> bool:
    """Bearer or Basic, each compared in constant time."""
    scheme, _, credentials = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and config.bearer_token is not None:
        return hmac.compare_digest(credentials.strip().encode(), config.bearer_token.get_secret_value().encode())
    if scheme == "basic" and config.basic_password is not None:
        try:
            user, _, password = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        ok_user = hmac.compare_digest(user.encode(), (config.basic_username or "").encode())
        ok_password = hmac.compare_digest(password.encode(), config.basic_password.get_secret_value().encode())
        return ok_user and ok_password
    return False


async def _body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is longer than `limit` (never read in full)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _reason(exc: ValidationError) -> str:
    """The first problem, by field path only (never echoing the input)."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return f"{where}: {first['msg']}"


def create_app(config: AlertsConfig, api_url: str, api_headers: dict[str, str] | None = None,
               slack_signing_secret: SecretStr | None = None, pitr_health: PitrHealth | None = None) -> FastAPI:
    """The receiver for `config`, handing runs to the Prefect API at `api_url`; with a
    Slack signing secret, it takes the incidents' Acknowledge clicks too; with
    `pitr_health`, /metrics says how the PITR clusters archive."""
    metrics = Metrics()
    if pitr_health is not None:
        metrics.registry.register(pitr_health)
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        async with httpx.AsyncClient(base_url=api_url.rstrip("/") + "/", headers=api_headers or {},
                                     timeout=httpx.Timeout(10.0, connect=3.0)) as client:
            state["handover"] = Handover(client, config.incident_deployment)
            state["health"] = RunbookHealth(client)
            metrics.registry.register(state["health"])
            yield

    app = FastAPI(title="runbooks alert receiver", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.metrics = metrics

    def reject(status: int, reason: str, why: str) -> JSONResponse:
        metrics.rejected.labels(reason).inc()
        log.warning("alert request refused (%s): %s", status, why)
        headers = {"WWW-Authenticate": 'Bearer realm="runbooks"'} if status == 401 else None
        return JSONResponse({"error": why}, status_code=status, headers=headers)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics() -> PlainTextResponse:
        try:  # the runbooks' own health, read from Prefect at most once a minute
            await asyncio.wait_for(state["health"].refresh(), HEALTH_READ_SECONDS)
        except asyncio.TimeoutError:
            state["health"].read_ok = 0
        if pitr_health is not None:
            await asyncio.to_thread(pitr_health.refresh)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(ENDPOINT)
    async def receive(request: Request) -> JSONResponse:
        t0 = time.monotonic()
        if not _authorized(config, request.headers.get("authorization", "")):
            return reject(401, "unauthorized", "missing or wrong credentials")
        body = await _body(request, config.max_body_bytes)
        if body is None:
            return reject(413, "too_large", f"body over {config.max_body_bytes} bytes")
        try:
            payload = WebhookPayload.model_validate_json(body)
        except ValidationError as exc:
            reason = "version" if any(e["loc"][:1] == ("version",) for e in exc.errors()) else "malformed"
            return reject(422, reason, _reason(exc))
        runs, unmatched = [], 0
        routed_alerts, resolved_alerts = [], []
        for alert in payload.alerts:
            metrics.received.labels(alert.status).inc()
            routed = route(config, alert)
            if routed is None:
                if alert.status == "firing":
                    unmatched += 1
                    metrics.unmatched.inc()
                    log.info("no route for alert %s (%s)", alert.labels.get("alertname", "?"), alert.fingerprint)
                else:
                    metrics.resolved.labels("no_incident").inc()
                continue
            if alert.status == "resolved":
                resolved_alerts.append(routed)  # its incident follows it; no runbook starts
                continue
            metrics.routed.labels(routed.route).inc()
            routed_alerts.append(routed)
        handover = state["handover"]
        results = await asyncio.gather(*(handover.run_for(r) for r in routed_alerts),
                                       *(handover.resolve(r) for r in resolved_alerts), return_exceptions=True)
        failures, updated = [], 0
        for routed, result in zip(routed_alerts + resolved_alerts, results):
            if isinstance(result, HandOverError):
                failures.append(result)
                continue
            if isinstance(result, BaseException):
                raise result
            if isinstance(result, str):  # a resolution
                metrics.resolved.labels(result).inc()
                updated += result == "incident_updated"
                continue
            run_id, new = result
            (metrics.runs.labels(routed.deployment or "none") if new else metrics.deduplicated).inc()
            runs.append({"fingerprint": routed.alert.fingerprint, "route": routed.route,
                         "deployment": routed.deployment, "flow_run_id": run_id, "new": new})
        metrics.handover.observe(time.monotonic() - t0)
        if failures:
            worst = max(failures, key=lambda f: f.status == 503)
            log.warning("alerts not handed over (%d of %d): %s", len(failures), len(routed_alerts), worst.reason)
            return JSONResponse({"error": worst.reason, "runs": runs}, status_code=worst.status)
        resolved = sum(a.status == "resolved" for a in payload.alerts)
        return JSONResponse({"runs": runs, "unmatched": unmatched, "resolved": resolved,
                             "incidents_updated": updated})

    @app.post(SLACK_ENDPOINT)
    async def slack_interaction(request: Request) -> JSONResponse:
        """Slack's click on an incident's Acknowledge button (a signed form post)."""
        if slack_signing_secret is None:
            return reject(404, "slack_not_configured", "no Slack signing secret is configured")
        body = await _body(request, config.max_body_bytes)
        if body is None:
            return reject(413, "too_large", f"body over {config.max_body_bytes} bytes")
        if not _slack_signed(slack_signing_secret, request.headers, body):
            return reject(401, "slack_signature", "missing, stale or wrong Slack signature")
        try:
            click = json.loads(parse_qs(body.decode())["payload"][0])
            action = next(a for a in click["actions"] if a.get("action_id") == "incident_ack")
            incident_id = incidents.check_id(str(action["value"]))
            user = click.get("user") or {}
            by = f"<@{user['id']}>" if user.get("id") else str(user.get("username") or user.get("name") or "someone")
        except (KeyError, IndexError, StopIteration, TypeError, ValueError, UnicodeDecodeError,
                incidents.UnknownIncident):
            return reject(422, "malformed", "not an incident button click")
        try:
            outcome = await state["handover"].acknowledge(incident_id, by[:80])
        except HandOverError as exc:
            return JSONResponse({"error": exc.reason}, status_code=exc.status)
        metrics.acks.labels(outcome).inc()
        text = {"acknowledged": f"{incident_id} acknowledged by {by}.",
                "already": f"{incident_id} was acknowledged already.",
                "unknown": f"no incident {incident_id}."}[outcome]
        return JSONResponse({"response_type": "ephemeral", "replace_original": False, "text": text})

    return app


def _slack_signed(secret: SecretStr, headers: Any, body: bytes) -> bool:
    """Slack's v0 signature: HMAC-SHA256 of `v0:<timestamp>:<body>`, within 5 minutes."""
    stamp, given = headers.get("x-slack-request-timestamp", ""), headers.get("x-slack-signature", "")
    if not stamp.isdigit() or abs(time.time() - int(stamp)) > SLACK_MAX_SKEW_SECONDS:
        return False
    expected = "v0=" + hmac.new(secret.get_secret_value().encode(), b"v0:" + stamp.encode() + b":" + body,
                                hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), given.encode())


def prefect_headers() -> dict[str, str]:
    """The credentials Prefect's own client would send (PREFECT_API_KEY or, for a
    self-hosted server, PREFECT_API_AUTH_STRING)."""
    from prefect.settings import get_current_settings

    api = get_current_settings().api
    if api.key is not None:
        return {"Authorization": f"Bearer {api.key.get_secret_value()}"}
    if api.auth_string is not None:
        token = base64.b64encode(api.auth_string.get_secret_value().encode()).decode()
        return {"Authorization": f"Basic {token}"}
    return {}


def receiver_server(settings: Any, api_url: str, host: str, port: int) -> Any:
    """The uvicorn server of the receiver for `settings` (which must have `[alerts]`)."""
    import uvicorn

    from tasks.errors import ConfigError

    if settings.alerts is None:
        raise ConfigError("runbooks.toml has no [alerts] section: the receiver needs its credentials "
                          "and routes (see docs/alerts.md)")
    pitr_health = PitrHealth(settings) if any(db.pitr for db in settings.databases.values()) else None
    app = create_app(settings.alerts, api_url, prefect_headers(), settings.notify.slack_signing_secret, pitr_health)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))


def describe(settings: Any, host: str, port: int, api_url: str) -> str:
    return (f"Alert receiver: http://{host}:{port}{ENDPOINT} ({len(settings.alerts.routes)} routes), "
            f"runs go to {api_url}")


def serve_receiver(host: str, port: int, say=print) -> None:  # type: ignore[no-untyped-def]
    """Run the receiver until SIGTERM or Ctrl-C, with the `[alerts]` config of runbooks.toml."""
    from deployments.server import configured_api_url, local_api_url
    from tasks.config import load_settings

    settings = load_settings()
    api_url = configured_api_url() or local_api_url()
    server = receiver_server(settings, api_url, host, port)
    say(describe(settings, host, port, api_url))
    # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again for the
    # handler it found: this one, so the command ends with status 0 and no traceback.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    say("runbooks receiver stopped")


@contextmanager
def receiver_beside(settings: Any, api_url: str, host: str, port: int, say=print) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """The receiver in a thread of this process for the block (`runbooks serve`)."""
    import threading

    from tasks.errors import RunbookError

    server = receiver_server(settings, api_url, host, port)
    thread = threading.Thread(target=server.run, name="runbooks-receiver", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RunbookError(f"the alert receiver could not listen on {host}:{port} (taken?): "
                               "pass --receiver-port, or --no-receiver")
        time.sleep(0.05)
    say(describe(settings, host, port, api_url))
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=15)
