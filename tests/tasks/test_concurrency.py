"""Target slots: one holder at a time, a waiter says who it waits for, and the slot of a
holder that is gone (heartbeat stopped, run ended) is freed, only that one."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.concurrency._sync import acquire_concurrency_slots_with_lease

from tasks import concurrency
from tasks.concurrency import ensure_limit, exclusive, read_holder, record_name
from tasks.errors import RunbookError


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(concurrency, "REPORT_SECONDS", 1)
    monkeypatch.setattr(concurrency, "TRY_SECONDS", 0.5)
    monkeypatch.setattr(concurrency, "HEARTBEAT_SECONDS", 0.5)


def _name() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def _active(lock: str) -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(lock).active_slots


@flow(name="slot-holder")
def hold(name: str, seconds: float, holding: threading.Event) -> str:
    with exclusive("database", name):
        holding.set()
        time.sleep(seconds)
    return "done"


def test_a_waiter_names_the_holder_and_gets_the_slot_when_it_is_free(fast, caplog):
    name, holding = _name(), threading.Event()
    holder = threading.Thread(target=hold, args=(name, 3.0, holding))
    holder.start()
    assert holding.wait(30)
    with get_client(sync_client=True) as client:
        record = read_holder(client, f"database:{name}")
    assert record["flow_run_name"] and record["pid"] and record["lease_id"]
    caplog.set_level(logging.INFO, logger="runbooks.concurrency")
    t0 = time.monotonic()
    with exclusive("database", name):
        waited = time.monotonic() - t0
        assert _active(f"database:{name}") == 1
    holder.join()
    assert waited > 1.5
    lines = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert lines and f"held by run '{record['flow_run_name']}'" in lines[0] and "state Running" in lines[0]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text  # a wait is no error
    assert _active(f"database:{name}") == 0
    with get_client(sync_client=True) as client:
        assert client.read_variable_by_name(record_name(f"database:{name}")) is None


def _abandoned_slot(lock: str, heartbeat_age: float, run_id: str | None = None) -> str:
    """A slot taken by a holder that left without releasing it (as a SIGKILL would)."""
    from prefect.client.schemas.actions import VariableCreate

    ensure_limit(lock)
    lease = acquire_concurrency_slots_with_lease([lock], 1, lease_duration=600, strict=True).lease_id
    with get_client(sync_client=True) as client:
        client.create_variable(VariableCreate(name=record_name(lock), value=json.dumps({
            "flow_run_id": run_id, "flow_run_name": "killed-run", "lease_id": str(lease), "host": "h",
            "pid": 1, "since": time.time() - 100, "heartbeat": time.time() - heartbeat_age})))
    return str(lease)


def test_the_slot_of_a_holder_whose_heartbeat_stopped_is_freed(fast, caplog):
    name = _name()
    _abandoned_slot(f"database:{name}", heartbeat_age=concurrency.STALE_SECONDS + 5)
    assert _active(f"database:{name}") == 1
    t0 = time.monotonic()
    with exclusive("database", name):
        assert _active(f"database:{name}") == 1
    assert time.monotonic() - t0 < 10
    assert any("freed the slot of run 'killed-run'" in r.getMessage() and "heartbeat stopped" in r.getMessage()
               for r in caplog.records)
    assert _active(f"database:{name}") == 0


@flow(name="ended-run")
def ended() -> None:
    pass


def test_the_slot_of_a_holder_whose_run_ended_is_freed(fast, caplog):
    from prefect.runtime import flow_run  # noqa: F401

    state = ended(return_state=True)
    name = _name()
    _abandoned_slot(f"database:{name}", heartbeat_age=0, run_id=str(state.state_details.flow_run_id))
    with exclusive("database", name):
        pass
    assert any("its run is Completed" in r.getMessage() for r in caplog.records)


def test_a_live_holder_keeps_its_slot_and_a_waiter_gives_up_naming_it(fast):
    name, holding = _name(), threading.Event()
    holder = threading.Thread(target=hold, args=(name, 6.0, holding))
    holder.start()
    assert holding.wait(30)
    try:
        with pytest.raises(RunbookError, match=rf"database:{name} stayed busy for 2s: held by run '"):
            with exclusive("database", name, wait_seconds=2):
                pass
        assert _active(f"database:{name}") == 1  # the live holder's slot was not touched
    finally:
        holder.join()
