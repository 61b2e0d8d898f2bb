"""Byte streams in stages that overlap: each stage runs in its own thread a few chunks
ahead of the next (hashing, zstd and AES, file and socket I/O all release the GIL)."""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def ahead(items: Iterable[T], depth: int = 8, name: str = "read-ahead") -> Iterator[T]:
    """Consume `items` in a thread, up to `depth` items ahead of the caller. An error of
    `items` is raised in the caller; a caller that stops early stops the thread."""
    queued: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, value: object) -> bool:
        while not stop.is_set():
            try:
                queued.put((kind, value), timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        source = iter(items)
        try:
            for item in source:
                if not put("item", item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put("error", exc)
            return
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()  # a generator's own cleanup (open files) runs here, at once
        put("end", None)

    # In the caller's context, so a run's logger and client work in the thread too.
    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(pump,), name=name, daemon=True).start()
    try:
        while True:
            kind, value = queued.get()
            if kind == "end":
                return
            if kind == "error":
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]
    finally:
        stop.set()
