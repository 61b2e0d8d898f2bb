"""Process-wide defaults for our entry points (CLI, demo, serve), set before Prefect is
imported: no telemetry, and no server log noise ("database is locked", CancelledError
tracebacks from the temporary server's shutdown) in an operator's terminal."""

import os

QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
    "PREFECT_LOGGING_LOG_PRINTS": "true",
}


def quiet_prefect() -> None:
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
