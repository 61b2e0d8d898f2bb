"""The shared Redis on 127.0.0.1:6379: each test (or benchmark) works under a key prefix
of its own and removes its keys afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis

REDIS_URL = "redis://127.0.0.1:6379/0"


@contextmanager
def redis_namespace(prefix: str = "rbtest") -> Iterator[tuple[redis.Redis, str]]:
    """A key prefix of our own on the shared Redis, its keys removed afterwards."""
    from tests.conftest import need  # (conftest imports the modules that import this one)

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        need(False, f"Redis at {REDIS_URL} is not reachable")
    ns = f"{prefix}:{uuid.uuid4().hex[:8]}:"
    try:
        yield client, ns
    finally:
        for key in client.scan_iter(f"{ns}*"):
            client.delete(key)
