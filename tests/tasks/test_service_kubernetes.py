"""The Kubernetes controller against a local stand-in of the Kubernetes API that records
the exact requests (no cluster here)."""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from tasks import service
from tasks.service import KubernetesController, KubernetesControllerConfig, ServiceError

DEPLOY = "/apis/apps/v1/namespaces/prod/deployments/fraiseql-api"
DEPLOYMENT = {"metadata": {"generation": 2},
              "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "fraiseql"}}},
              "status": {"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3,
                         "readyReplicas": 3}}
# -1 from before the restart below, -2 and -3 from it; -3 is still starting (its log: HTTP 400).
PODS = {"items": [{"metadata": {"name": f"fraiseql-api-{i}", "creationTimestamp": created}}
                  for i, created in ((1, "2026-11-30T04:00:00Z"), (2, "2026-11-30T04:50:05Z"),
                                     (3, "2026-11-30T04:50:07Z"))]}
RESTART = datetime(2026, 11, 30, 4, 50, 1, 500000, tzinfo=timezone.utc)


@pytest.fixture
def kube():
    seen: list[dict] = []
    state = {"status": 200}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            url = urlsplit(self.path)
            seen.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                         "headers": dict(self.headers.items()), "body": json.loads(raw) if raw else None})
            status = state["status"] if not url.path.endswith("fraiseql-api-3/log") else state.get("pod3", 400)
            if status != 200:
                body, ctype = json.dumps({"kind": "Status", "code": status}), "application/json"
            elif url.path.endswith("/log"):
                body, ctype = "line one\nline two\n", "text/plain"
            elif url.path.endswith("/pods"):
                body, ctype = json.dumps(PODS), "application/json"
            else:
                body, ctype = json.dumps(DEPLOYMENT), "application/json"
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PATCH = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ctl = KubernetesController("api", KubernetesControllerConfig(
        api_url=f"http://127.0.0.1:{server.server_port}", token="k8s-t0ken", namespace="prod",
        deployment="fraiseql-api", replicas=3))
    yield ctl, seen, state
    server.shutdown()
    server.server_close()


def test_rollout_restart_patches_the_pod_template(kube):
    ctl, seen, _ = kube
    status = ctl.restart()
    assert status.running and status.detail == "3/3 replicas ready"
    patch = seen[0]
    assert (patch["method"], patch["path"]) == ("PATCH", DEPLOY)
    assert patch["headers"]["Content-Type"] == "application/strategic-merge-patch+json"
    assert patch["headers"]["Authorization"] == "Bearer k8s-t0ken"
    annotations = patch["body"]["spec"]["template"]["metadata"]["annotations"]
    assert list(annotations) == ["kubectl.kubernetes.io/restartedAt"]


def test_scale_uses_the_scale_subresource(kube):
    ctl, seen, _ = kube
    ctl.stop()
    ctl.start()
    patches = [(r["path"], r["headers"]["Content-Type"], r["body"]) for r in seen if r["method"] == "PATCH"]
    assert patches == [(f"{DEPLOY}/scale", "application/merge-patch+json", {"spec": {"replicas": 0}}),
                       (f"{DEPLOY}/scale", "application/merge-patch+json", {"spec": {"replicas": 3}})]


def test_logs_of_every_pod(kube):
    ctl, seen, _ = kube
    assert ctl.logs(20) == ["fraiseql-api-1: line one", "fraiseql-api-1: line two",
                            "fraiseql-api-2: line one", "fraiseql-api-2: line two",
                            "fraiseql-api-3: (no logs: HTTP 400)"]
    pods = next(r for r in seen if r["path"].endswith("/pods"))
    assert pods["query"] == {"labelSelector": ["app=fraiseql"]}
    assert next(r for r in seen if r["path"].endswith("/log"))["query"] == {"tailLines": ["20"]}


def test_logs_since_a_restart_are_the_new_pods(kube):
    ctl, seen, state = kube
    assert ctl.logs(1000, since=RESTART) == ["fraiseql-api-2: line one", "fraiseql-api-2: line two",
                                             "fraiseql-api-3: (no logs: HTTP 400)"]
    assert [r["path"].rsplit("/", 2)[1] for r in seen if r["path"].endswith("/log")] == \
        ["fraiseql-api-2", "fraiseql-api-3"]
    state["pod3"] = 403
    with pytest.raises(ServiceError, match="refused the logs of pod fraiseql-api-3 .*lacks that permission"):
        ctl.logs(1000, since=RESTART)


@pytest.mark.parametrize("code, message", [(403, "refused PATCH .* lacks that permission"),
                                           (404, "deployment prod/fraiseql-api not found")])
def test_refusals_name_the_service_and_restart_nothing(kube, code, message):
    ctl, seen, state = kube
    state["status"] = code
    with pytest.raises(ServiceError, match=f"service 'api': .*{message}") as err:
        ctl.restart()
    assert "k8s-t0ken" not in str(err.value)
    assert len(seen) == 1  # the refused patch, nothing after it


# --- credentials as kubectl finds them, and restarts that wait for the rollout -----------


class Cluster:
    """A stateful stand-in of one Deployment: a restart or a scale bumps its generation, and
    each GET afterwards moves the rollout one step on (as the controller manager would)."""

    def __init__(self, tls: tuple[str, str] | None = None, deadline_exceeded: bool = False) -> None:
        self.seen: list[dict] = []
        self.generation, self.observed, self.updated, self.available, self.total = 1, 1, 3, 3, 3
        self.want, self.deadline_exceeded = 3, deadline_exceeded
        cluster = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                cluster.seen.append({"method": self.command, "path": url.path,
                                     "headers": dict(self.headers.items()), "body": json.loads(raw) if raw else None})
                body = cluster.answer(self.command, url.path, json.loads(raw) if raw else None)
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_port

    def answer(self, method: str, path: str, body: dict | None) -> dict:
        if method == "PATCH":  # new pods to roll out; none of them up yet
            self.generation += 1
            if path.endswith("/scale"):
                self.want = body["spec"]["replicas"]
            self.updated, self.available = 0, 0
        elif path.endswith("/pods"):
            return {"items": []}
        elif self.observed < self.generation:
            self.observed = self.generation
        elif self.updated < self.want:
            self.updated += 1
            self.total = self.want + self.updated  # the old pods still run beside the new
        elif self.total > self.want:
            self.total = self.want
        elif self.available < self.updated:
            self.available = self.updated
        conditions = [{"type": "Progressing", "reason": "ProgressDeadlineExceeded"}] if self.deadline_exceeded else []
        return {"metadata": {"generation": self.generation},
                "spec": {"replicas": self.want, "selector": {"matchLabels": {"app": "fraiseql"}}},
                "status": {"observedGeneration": self.observed, "replicas": self.total, "updatedReplicas": self.updated,
                           "availableReplicas": self.available, "readyReplicas": self.available,
                           "conditions": conditions}}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def cluster():
    made: list[Cluster] = []

    def make(**kwargs: object) -> Cluster:
        made.append(Cluster(**kwargs))
        return made[-1]

    yield make
    for c in made:
        c.stop()


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch):
    monkeypatch.setattr(service, "ROLLOUT_POLL_SECONDS", 0.01)


def test_restart_waits_until_the_rollout_is_done_as_kubectl_does(cluster):
    c = cluster()
    ctl = KubernetesController("api", KubernetesControllerConfig(api_url=f"http://127.0.0.1:{c.port}",
                                                                 namespace="prod", deployment="fraiseql-api"))
    status = ctl.restart()
    # observed, 3 updated one by one, the old ones gone, all available: then done (and status).
    assert (c.observed, c.updated, c.total, c.available) == (c.generation, 3, 3, 3)
    assert status.detail == "3/3 replicas ready"
    assert [r["method"] for r in c.seen] == ["PATCH"] + ["GET"] * 7


def test_a_rollout_past_its_progress_deadline_fails_the_restart(cluster):
    c = cluster(deadline_exceeded=True)
    ctl = KubernetesController("api", KubernetesControllerConfig(api_url=f"http://127.0.0.1:{c.port}",
                                                                 namespace="prod", deployment="fraiseql-api"))
    with pytest.raises(ServiceError, match="prod/fraiseql-api exceeded its progress deadline"):
        ctl.restart()


def test_a_rollout_that_does_not_finish_in_time_says_what_it_waits_for(cluster):
    c = cluster()
    ctl = KubernetesController("api", KubernetesControllerConfig(
        api_url=f"http://127.0.0.1:{c.port}", namespace="prod", deployment="fraiseql-api",
        rollout_timeout_seconds=0.001))
    with pytest.raises(ServiceError, match="rollout of deployment prod/fraiseql-api not finished after"):
        ctl.start()


def test_kubeconfig_context_with_an_exec_credential_plugin(cluster, tmp_path, monkeypatch):
    """As EKS's and GKE's kubeconfigs do: the token comes from a command, the namespace
    from the chosen context (not the current one)."""
    c = cluster()
    plugin = tmp_path / "get-token"
    plugin.write_text('#!/bin/sh\necho \'{"apiVersion": "client.authentication.k8s.io/v1beta1", '
                      '"kind": "ExecCredential", "status": {"token": "from-the-plugin"}}\'\n')
    plugin.chmod(0o755)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: prod
  cluster: {{server: "http://127.0.0.1:{c.port}"}}
contexts:
- name: eks-prod
  context: {{cluster: prod, user: eks, namespace: payments}}
- name: other
  context: {{cluster: prod, user: static}}
current-context: other
users:
- name: eks
  user:
    exec: {{apiVersion: client.authentication.k8s.io/v1beta1, command: "{plugin}"}}
- name: static
  user: {{token: not-this-one}}
""")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    ctl = KubernetesController("api", KubernetesControllerConfig(kubeconfig=kubeconfig, context="eks-prod",
                                                                 deployment="fraiseql-api"))
    ctl.status()
    assert c.seen[-1]["path"] == "/apis/apps/v1/namespaces/payments/deployments/fraiseql-api"
    assert c.seen[-1]["headers"]["Authorization"] == "Bearer from-the-plugin"
    # $KUBECONFIG and its current-context, as kubectl
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    KubernetesController("api", KubernetesControllerConfig(deployment="fraiseql-api")).status()
    assert c.seen[-1]["path"] == "/apis/apps/v1/namespaces/default/deployments/fraiseql-api"
    assert c.seen[-1]["headers"]["Authorization"] == "Bearer not-this-one"


def test_in_a_pod_the_service_account_is_used(cluster, tmp_path, monkeypatch):
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    c = cluster(tls=(str(cert), str(key)))
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("pod-token")
    (account / "namespace").write_text("shop")
    (account / "ca.crt").write_bytes(cert.read_bytes())
    monkeypatch.setattr(service, "SERVICE_ACCOUNT", account)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(c.port))
    KubernetesController("api", KubernetesControllerConfig(deployment="fraiseql-api")).status()
    assert c.seen[-1]["path"] == "/apis/apps/v1/namespaces/shop/deployments/fraiseql-api"
    assert c.seen[-1]["headers"]["Authorization"] == "Bearer pod-token"


def test_no_credentials_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(ServiceError, match="service 'api': no usable Kubernetes credentials"):
        KubernetesController("api", KubernetesControllerConfig(deployment="fraiseql-api"))
