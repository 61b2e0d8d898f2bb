"""Process-wide defaults for our entry points (CLI, demo, serve, tests), set before
Prefect is imported: no telemetry, no server log noise ("database is locked",
CancelledError tracebacks from the temporary server's shutdown) in a terminal, and
concurrency leases kept on disk (PREFECT_HOME/concurrency_leases) by every server we
start, so a slot held across a server restart, or by a run whose temporary server died
with it, can still be released."""

import os
from pathlib import Path

QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
    "PREFECT_LOGGING_LOG_PRINTS": "true",
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
    # A command without a server starts a temporary one; Prefect gives it 20 s, which a busy
    # host (as in an incident) can miss: "Timed out while attempting to connect to ephemeral ...".
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


def quiet_prefect() -> None:
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    if not os.environ.get("XDG_RUNTIME_DIR"):
        # pgserver asks platformdirs for a runtime dir, which warns when none is set
        # (root shells, CI). Give it the private one it would fall back to anyway.
        runtime = Path(f"/tmp/runtime-{os.getuid()}")
        runtime.mkdir(mode=0o700, exist_ok=True)
        if runtime.stat().st_uid == os.getuid():  # never someone else's directory
            runtime.chmod(0o700)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)
