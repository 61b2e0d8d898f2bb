"""One changing run per target at a time: a strict Prefect global concurrency limit of
one slot named after the target (e.g. `database:orders`), created on first use."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists

from tasks.errors import RunbookError


def limit_name(kind: str, name: str) -> str:
    return f"{kind}:{name}"


def ensure_limit(name: str) -> None:
    """Create the one-slot limit if missing (two runs may race here; both are fine)."""
    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, limit=1)
        except ObjectAlreadyExists:
            pass


@contextmanager
def exclusive(kind: str, name: str, wait_seconds: float = 6 * 3600) -> Iterator[None]:
    """Hold the target's slot for the body; waits (in order) while another run holds it."""
    lock = limit_name(kind, name)
    ensure_limit(lock)
    with ExitStack() as stack:
        try:
            stack.enter_context(concurrency(lock, occupy=1, strict=True, timeout_seconds=wait_seconds))
        except TimeoutError:
            raise RunbookError(f"{lock} stayed busy for {wait_seconds:.0f}s: another run holds it") from None
        yield
