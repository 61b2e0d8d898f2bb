"""The Kubernetes controller against a local stand-in of the Kubernetes API that records
the exact requests (no cluster here)."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from tasks.service import KubernetesController, KubernetesControllerConfig, ServiceError

DEPLOY = "/apis/apps/v1/namespaces/prod/deployments/fraiseql-api"
DEPLOYMENT = {"spec": {"replicas": 3, "selector": {"matchLabels": {"app": "fraiseql"}}},
              "status": {"readyReplicas": 3}}
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
