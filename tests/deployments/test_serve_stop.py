"""`runbooks serve` stops on SIGTERM whenever it arrives: Prefect's own runner answers a
SIGTERM during its start with a `sys.exit` from the signal handler, which Python drops
when it lands in a `__del__`, and serve ran on (seen in the e2e restart test)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from deployments import serve


@pytest.fixture
def sigterm_restored():
    before = signal.getsignal(signal.SIGTERM)
    serve._stop_requested.clear()
    yield
    signal.signal(signal.SIGTERM, before)
    serve._stop_requested.clear()


@pytest.mark.timeout(90)
def test_a_stop_requested_before_the_runner_started_stops_it_once_started(sigterm_restored):
    serve._stop_requested.set()  # as if a _Stopped raised by the early handler had been dropped
    t0 = time.monotonic()
    serve._run([], poll_seconds=1.0)
    assert time.monotonic() - t0 < 30


@pytest.mark.timeout(90)
def test_sigterm_to_a_running_runner_stops_it_without_raising_into_a_frame(sigterm_restored):
    sent = threading.Event()

    def kill_when_serving() -> None:
        while signal.getsignal(signal.SIGTERM) in (None, signal.SIG_DFL) or \
                getattr(signal.getsignal(signal.SIGTERM), "__name__", "") != "handle_sigterm":
            time.sleep(0.01)  # the runner has installed its handler (ours)
        os.kill(os.getpid(), signal.SIGTERM)
        sent.set()

    threading.Thread(target=kill_when_serving, daemon=True).start()
    serve._run([], poll_seconds=1.0)  # returns instead of raising SystemExit
    assert sent.is_set()
    assert serve._stop_requested.is_set()
