"""One answer to "is this failure worth retrying?", shared by every task.

Transient: connection errors, timeouts, HTTP 429/5xx, S3 throttling.
Permanent (fail at once, the message says what to fix): everything else,
in particular every `RunbookError`.
"""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Any

import httpx

from tasks.errors import DatabaseUnavailable, RunbookError, TransientStoreError

RETRIES = 3
# Exponential backoff; RUNBOOKS_RETRY_DELAY_SCALE shrinks or stretches it (tests use 0.01).
_SCALE = float(os.environ.get("RUNBOOKS_RETRY_DELAY_SCALE", "1"))
RETRY_DELAYS = [2 * _SCALE, 8 * _SCALE, 30 * _SCALE]
RETRY_JITTER = 0.5  # ... with up to 50 % jitter

_THROTTLING = {"Throttling", "ThrottlingException", "SlowDown", "RequestLimitExceeded",
               "TooManyRequestsException", "ServiceUnavailable", "InternalError", "RequestTimeout"}


def is_transient(exc: BaseException) -> bool:
    """True when `exc` is the kind of failure that a later attempt may not meet."""
    if isinstance(exc, RunbookError):
        return False
    if isinstance(exc, (TransientStoreError, DatabaseUnavailable, ConnectionError, TimeoutError, socket.timeout,
                        subprocess.TimeoutExpired)):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code == 429 or exc.response.status_code >= 500
    if isinstance(exc, (httpx.TransportError,)):
        return True
    try:
        import botocore.exceptions as bx
        import psycopg
        import redis
    except ImportError:  # pragma: no cover - all are dependencies
        return False
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return True
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionClosedError,
                        bx.ReadTimeoutError, bx.ConnectTimeoutError)):
        return True
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return err.get("Code") in _THROTTLING or status == 429 or status >= 500
    if isinstance(exc, psycopg.OperationalError):
        # Connection refused / reset, server shutting down; not auth failures.
        text = str(exc).lower()
        return not any(s in text for s in ("password", "authentication", "does not exist",
                                           "permission denied"))
    return False


def retry_condition_fn(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only transient failures."""
    exc = state.data
    if isinstance(exc, BaseException):
        return is_transient(exc)
    try:
        state.result()
    except Exception as raised:  # noqa: BLE001 - we classify every failure
        return is_transient(raised)
    return False


RETRY_OPTIONS: dict[str, Any] = {
    "retries": RETRIES,
    "retry_delay_seconds": RETRY_DELAYS,
    "retry_jitter_factor": RETRY_JITTER,
    "retry_condition_fn": retry_condition_fn,
}
