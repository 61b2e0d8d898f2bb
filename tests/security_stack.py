"""The demo service under the process controller, with the sample database, its own
namespace on the Redis here, a [security] section and Slack's stand-in: what the
security runbooks' tests run against."""

from __future__ import annotations

import hashlib
import json
import sys
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest

from demo.service import runbooks_section
from tasks.config import load_settings
from tasks.probes import wait_until_ready
from tests.shared_redis import REDIS_URL, redis_namespace

# The service's limits file: the standard tier is kept small for the rate-limit tests.
LIMITS = """# requests per minute per key
default_rpm = 60

[tiers]
standard = 5
"""


def security_section(tmp_path: Path, ns: str, redis_url: str = REDIS_URL, extra: str = "") -> str:
    return f"""
[security]
redis_url = "{redis_url}"
redis_prefix = "{ns}"
delivery_dir = "{tmp_path / 'keys'}"
verify_deadline_seconds = 3
{extra}
"""


@pytest.fixture
def security_stack(sample_db, tmp_path, write_config, slack):
    from tests.conftest import free_port  # (conftest imports this module)

    with redis_namespace() as (_, ns):  # the service's keys
        port = free_port()
        limits = tmp_path / "limits.toml"
        limits.write_text(LIMITS)
        argv = [sys.executable, "-m", "demo.service", "--dsn", sample_db, "--port", str(port), "--redis", REDIS_URL,
                "--key-prefix", ns, "--limits", str(limits)]
        text = f"""
[databases.orders]
dsn = "{sample_db}"
[stores.local]
kind = "local"
path = "{tmp_path / 'store'}"
[notify]
slack_token = "xoxb-test-token"
slack_api_url = "{slack.url}"
{runbooks_section(sample_db, port, tmp_path, command=argv, grace_seconds=1)}
{security_section(tmp_path, ns)}
[security.rate_limits]
config_file = "{limits}"
"""
        write_config(text)
        ctl = load_settings().controller("api")
        ctl.start()
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, deadline_seconds=20, interval=0.2)
        yield {"url": url, "dsn": sample_db, "ns": ns, "tmp": tmp_path, "slack": slack, "ctl": ctl,
               "text": text, "limits": limits, "port": port}
        ctl.stop()


def new_key(dsn: str, user_id: int = 7, tier: str = "premium",
            permissions: tuple[str, ...] = ("orders:read", "profile:read"), days_old: float = 30) -> tuple[int, str]:
    """A key (and its plaintext) created `days_old` days ago, so its history can be older than today."""
    plaintext = f"fq_live_{uuid.uuid4().hex}{uuid.uuid4().hex}"
    with psycopg.connect(dsn) as conn:
        key_id = conn.execute("INSERT INTO api_keys (user_id, key_prefix, key_hash, tier, permissions, created_at) "
                              "VALUES (%s, %s, %s, %s, %s, now() - %s * interval '1 day') RETURNING id",
                              (user_id, plaintext[:16], hashlib.sha256(plaintext.encode()).hexdigest(), tier,
                               list(permissions), days_old)).fetchone()[0]
    return key_id, plaintext


def call(url: str, plaintext: str, path: str = "/api/orders", ip: str = "198.51.100.7") -> int:
    return httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {plaintext}",
                                              "X-Forwarded-For": ip}, timeout=10).status_code


def usual_use(dsn: str, key_id: int, hours_ago: float = 3, count: int = 30) -> None:
    """The key's history: orders read from its owner's address, a few hours back."""
    with psycopg.connect(dsn) as conn:
        for i in range(count):
            details = {"api_key_id": key_id, "operation": "orders", "tables": ["orders"],
                       "fields": ["orders.id", "orders.status", "orders.total_cents"], "ip": "198.51.100.7",
                       "rows": 10, "status": 200}
            conn.execute("INSERT INTO audit_logs (actor_user_id, action, target, details, created_at) "
                         "VALUES (7, 'api.request', %s, %s, now() - %s * interval '1 hour' + %s * interval '1 s')",
                         (f"api_key:{key_id}", json.dumps(details), hours_ago, i))


def attack(url: str, plaintext: str, count: int = 25) -> None:
    for _ in range(count):
        assert call(url, plaintext, "/api/profile", ip="203.0.113.66") == 200


def artifacts() -> list[dict]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.request("POST", "/artifacts/filter", json={"limit": 200, "offset": 0,
                                                                          "sort": "CREATED_DESC"}).json()


def artifact(key: str) -> str:
    found = [a for a in artifacts() if a["key"] == key]
    assert found, f"no artifact {key}"
    return json.dumps(found[0]["data"]) if not isinstance(found[0]["data"], str) else found[0]["data"]


def logs_text() -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return "\n".join(entry["message"] for entry in
                         client.request("POST", "/logs/filter", json={"limit": 200, "offset": 0,
                                                                     "sort": "TIMESTAMP_DESC"}).json())


def prefect_database_bytes() -> bytes:
    """The test server's SQLite database, with its write-ahead log."""
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url.get_secret_value()
    path = Path(url.split("///", 1)[1])
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


