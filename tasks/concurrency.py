"""One changing run per target at a time: a strict Prefect global concurrency limit of
one slot named after the target (e.g. `database:orders`), created on first use.

A slot must never outlive its holder. Prefect's lease (renewed while the holder lives)
covers a killed run on a server that keeps running; it does not cover a killed run
whose temporary server died with it (no lease reaper runs there) nor, with the default
in-memory lease storage, a server restart. So the holder also keeps a record beside the
limit, a Prefect Variable with its run and a heartbeat. A waiter reads it to say every
30 s who it waits for, and revokes the holder's lease once the heartbeat has stopped or
the holder's run has ended: exact (only that lease), and at most one waiter wins, since
only one can delete the record.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency._sync import (acquire_concurrency_slots_with_lease,
                                       release_concurrency_slots_with_lease)
from prefect.concurrency._leases import maintain_concurrency_lease
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.logging import get_logger

from tasks.errors import RunbookError

LEASE_SECONDS = 60       # Prefect's lease (its minimum); renewed while the holder lives
HEARTBEAT_SECONDS = 5    # the holder's record is refreshed this often
STALE_SECONDS = 20       # a record older than this belongs to a holder that is gone
REPORT_SECONDS = 30      # a waiting run says who it waits for this often
TRY_SECONDS = 5          # one acquisition attempt, between checks of the holder
ENDED = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class _TryTimedOut(logging.Filter):
    """Each acquisition try in `_acquire` may end in the TimeoutError it expects, which
    Prefect's acquisition service logs as an ERROR ("failed to process item") every few
    seconds of a wait: an error line an operator would have to learn to ignore."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (len(args) == 2 and args[0] == "ConcurrencySlotAcquisitionWithLeaseService"
                    and "TimeoutError" in repr(args[1]))


logging.getLogger("prefect._internal.concurrency").addFilter(_TryTimedOut())


def limit_name(kind: str, name: str) -> str:
    return f"{kind}:{name}"


def record_name(lock: str) -> str:
    """The Variable that names the slot's holder (Variable names allow [a-z0-9_-])."""
    return "runbooks-slot-" + lock.replace(":", "-")


def ensure_limit(name: str) -> None:
    """Create the one-slot limit if missing (two runs may race here; both are fine)."""
    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, limit=1)
        except ObjectAlreadyExists:
            pass


def _log() -> Any:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run (tests, the CLI before a run)
        return get_logger("runbooks.concurrency")


def current_run() -> tuple[str | None, str | None, str | None]:
    """(flow run id, run name, flow name) of the run we are in; Nones outside a run."""
    from prefect.runtime import flow_run

    return (str(flow_run.id) if flow_run.id else None), (flow_run.name or None), (flow_run.flow_name or None)


def _now() -> float:
    return datetime.now(timezone.utc).timestamp()


def read_holder(client: SyncPrefectClient, lock: str) -> dict[str, Any] | None:
    variable = client.read_variable_by_name(record_name(lock))
    if variable is None or not isinstance(variable.value, str):
        return None
    try:
        return json.loads(variable.value)
    except ValueError:
        return None


def _write_holder(client: SyncPrefectClient, lock: str, holder: dict[str, Any]) -> None:
    from prefect.client.schemas.actions import VariableCreate, VariableUpdate

    name, value = record_name(lock), json.dumps({**holder, "heartbeat": _now()})
    try:
        client.update_variable(VariableUpdate(name=name, value=value))
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code != 404:
            raise
        try:
            client.create_variable(VariableCreate(name=name, value=value))
        except ObjectAlreadyExists:
            client.update_variable(VariableUpdate(name=name, value=value))


def _drop_holder(client: SyncPrefectClient, lock: str, lease_id: str) -> None:
    """Delete the record if it is still ours (a reclaimed one may be another's now)."""
    held = read_holder(client, lock)
    if held and held.get("lease_id") == lease_id:
        try:
            client.delete_variable_by_name(record_name(lock))
        except ObjectNotFound:
            pass


def _run_state(client: SyncPrefectClient, run_id: str | None) -> str:
    """The holder's run state name ('gone' when the server does not know the run)."""
    if not run_id:
        return "no run"
    try:
        run = client.read_flow_run(UUID(run_id))
    except (ObjectNotFound, ValueError):
        return "gone"
    return run.state.name if run.state else "unknown"


def describe_holder(holder: dict[str, Any] | None, state: str) -> str:
    if holder is None:
        return "a holder that left no record"
    since = datetime.fromtimestamp(holder.get("since", 0), timezone.utc)
    run = holder.get("flow_run_name") or "a run"
    return (f"run '{run}' ({holder.get('flow_run_id') or 'no id'}, state {state}) "
            f"on {holder.get('host')} pid {holder.get('pid')}, since {since:%H:%M:%S} UTC")


def reclaim_if_gone(client: SyncPrefectClient, lock: str) -> tuple[dict[str, Any] | None, str, bool]:
    """(holder record, its run's state, reclaimed?). A holder whose heartbeat stopped
    or whose run ended loses its slot: its lease is revoked, nothing else is touched."""
    holder = read_holder(client, lock)
    if holder is None:
        return None, "", False
    state = _run_state(client, holder.get("flow_run_id"))
    stale = _now() - float(holder.get("heartbeat", 0)) > STALE_SECONDS
    ended = state.upper() in ENDED or state == "gone"
    if not (stale or ended):
        return holder, state, False
    try:
        client.delete_variable_by_name(record_name(lock))  # only one waiter gets past this
    except ObjectNotFound:
        return holder, state, False
    try:
        client.release_concurrency_slots_with_lease(UUID(holder["lease_id"]))
    except (ObjectNotFound, KeyError, ValueError):
        pass  # the server had already let the lease go
    why = "its heartbeat stopped" if stale else f"its run is {state}"
    _log().warning("%s: freed the slot of %s (%s)", lock, describe_holder(holder, state), why)
    return holder, state, True


def _acquire(lock: str, wait_seconds: float, run_id: str | None,
             refuse: Callable[[dict[str, Any], str], str | None] | None = None) -> UUID:
    """Acquire the slot, saying every 30 s who holds it; reclaim it from a dead holder.
    `refuse(holder, state)` may return a reason not to wait behind that holder."""
    holder = ConcurrencyLeaseHolder(type="flow_run", id=UUID(run_id)) if run_id else None
    started = time.monotonic()
    next_report = started + REPORT_SECONDS
    while True:
        remaining = wait_seconds - (time.monotonic() - started)
        try:
            response = acquire_concurrency_slots_with_lease(
                [lock], 1, timeout_seconds=max(0.1, min(TRY_SECONDS, remaining)),
                lease_duration=LEASE_SECONDS, strict=True, holder=holder, suppress_warnings=True)
            return response.lease_id
        except TimeoutError:
            pass
        with get_client(sync_client=True) as client:
            held, state, reclaimed = reclaim_if_gone(client, lock)
        if reclaimed:
            continue
        if refuse is not None and held is not None and (reason := refuse(held, state)):
            raise RunbookError(reason)
        waited = time.monotonic() - started
        if waited >= wait_seconds:
            raise RunbookError(f"{lock} stayed busy for {wait_seconds:.0f}s: held by "
                               f"{describe_holder(held, state)}") from None
        if time.monotonic() >= next_report:
            hint = ("" if held else f"; if no run holds it, free it with "
                    f"`prefect gcl update {lock} --active-slots 0`")
            _log().info("waiting for %s (%.0f s so far): held by %s%s", lock, waited,
                        describe_holder(held, state), hint)
            next_report += REPORT_SECONDS


@contextmanager
def _heartbeat(lock: str, record: dict[str, Any]) -> Iterator[None]:
    """Refresh the holder's record until the body ends."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            try:
                with get_client(sync_client=True) as client:
                    _write_holder(client, lock, record)
            except Exception:  # noqa: BLE001 - a server restart; the next beat retries
                pass

    with get_client(sync_client=True) as client:
        _write_holder(client, lock, record)
    thread = threading.Thread(target=beat, name=f"slot-heartbeat {lock}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


@contextmanager
def exclusive(kind: str, name: str, wait_seconds: float = 6 * 3600,
              refuse: Callable[[dict[str, Any], str], str | None] | None = None) -> Iterator[None]:
    """Hold the target's slot for the body; while another run holds it, wait and say so
    (or fail at once when `refuse` gives a reason not to wait behind that holder)."""
    lock = limit_name(kind, name)
    ensure_limit(lock)
    run_id, run_name, flow_name = current_run()
    lease_id = _acquire(lock, wait_seconds, run_id, refuse)
    record = {"flow_run_id": run_id, "flow_run_name": run_name, "flow": flow_name, "lease_id": str(lease_id),
              "host": socket.gethostname(), "pid": os.getpid(), "since": _now()}
    try:
        # A renewal that fails while the server restarts must not kill a restore.
        with _heartbeat(lock, record), maintain_concurrency_lease(
                lease_id, LEASE_SECONDS, raise_on_lease_renewal_failure=False, suppress_warnings=True):
            yield
    finally:
        try:
            with get_client(sync_client=True) as client:
                _drop_holder(client, lock, str(lease_id))
        finally:
            release_concurrency_slots_with_lease(lease_id)
