"""The process controller, end to end on real processes (the demo service included)."""

from __future__ import annotations

import sys
import time

import pytest

from tasks.probes import ProbeKind, probe, wait_until_ready
from tasks.service import ProcessController, ProcessControllerConfig, ServiceError
from tests.conftest import free_port


def controller(tmp_path, command: list[str], grace: float = 10) -> ProcessController:
    return ProcessController("api", ProcessControllerConfig(
        command=command, pid_file=tmp_path / "api.pid", log_file=tmp_path / "api.log", grace_seconds=grace))


def test_start_stop_restart_the_demo_service(tmp_path, sample_db):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ctl = controller(tmp_path, [sys.executable, "-m", "demo.service", "--dsn", sample_db, "--port", str(port)])
    first = ctl.start()
    try:
        assert first.running and first.replicas == 1
        assert ctl.start().pid == first.pid  # idempotent
        assert wait_until_ready(url, deadline_seconds=20, interval=0.2).ok
        again = ctl.restart()
        assert again.running and again.pid != first.pid
        assert wait_until_ready(url, deadline_seconds=20, interval=0.2).ok
    finally:
        stopped = ctl.stop()
    assert not stopped.running and not (tmp_path / "api.pid").exists()
    assert not probe(url, ProbeKind.LIVE, timeout=0.5).ok
    assert ctl.stop().running is False  # idempotent


def test_sigkill_after_the_grace_period(tmp_path):
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                      "print('ignoring SIGTERM', flush=True); time.sleep(60)"]
    ctl = controller(tmp_path, stubborn, grace=0.5)
    assert ctl.start().running
    assert not ctl.stop().running


def test_a_service_that_crashes_on_start_shows_its_log(tmp_path):
    ctl = controller(tmp_path, [sys.executable, "-c",
                                "import sys, time; time.sleep(0.3); print('boom: no config'); sys.exit(3)"])
    assert ctl.start().running
    for _ in range(100):
        if not ctl.status().running:
            break
        time.sleep(0.05)
    assert not ctl.status().running
    assert ctl.logs() == ["boom: no config"]


def test_missing_binary_and_bad_scale(tmp_path):
    with pytest.raises(ServiceError, match=r"service 'api': cannot start /nonexistent/bin"):
        controller(tmp_path, ["/nonexistent/bin"]).start()
    with pytest.raises(ServiceError, match="0 or 1 instance, not 3"):
        controller(tmp_path, ["true"]).scale(3)
