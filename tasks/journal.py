"""Durable records of what a run creates and changes, so that a crash leaves nothing
unknown behind.

A run writes its record into the database's backup store *before* each thing it creates
or changes (a scratch or restored database, stopped services, each rename) and marks it
finished at its end, whatever the outcome. Prefect's in-process rollback hooks die with
the process; this record does not. The next run of the same database holds the
database's slot, so an unfinished record it finds belongs to a run that died: it cleans
up after it (tasks.recovery.settle_abandoned) and says what it did.

Layout in the store: `_runs/<database>/<record id>.json`.
"""

from __future__ import annotations

import os
import secrets
import socket
from datetime import datetime, timezone

from pydantic import BaseModel, Field

from tasks.concurrency import current_run
from tasks.errors import StoreError
from tasks.storage import Store

PREFIX = "_runs"


class RunRecord(BaseModel):
    """What one run of a database has created and changed so far."""

    id: str
    database: str
    flow: str
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    host: str = Field(default_factory=socket.gethostname)
    pid: int = Field(default_factory=os.getpid)
    started_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    updated_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    step: str = "started"
    databases: list[str] = Field(default_factory=list)  # created by the run: dropped if abandoned
    production: str | None = None  # the production database's name
    aside: str | None = None  # what production is renamed to on promotion
    restored: str | None = None  # the restored database promoted in its place
    services_stopped: list[str] = Field(default_factory=list)
    side_schema: str | None = None  # a table restore's staging schema in production
    aside_schema: str | None = None  # where a table restore keeps the replaced rows
    finished: bool = False
    outcome: str = ""

    @property
    def key(self) -> str:
        return f"{PREFIX}/{self.database}/{self.id}.json"


class Journal:
    """The record of the current run; every change is written through at once."""

    def __init__(self, store: Store, record: RunRecord) -> None:
        self.store, self.record = store, record

    @classmethod
    def begin(cls, store: Store, database: str, flow: str) -> "Journal":
        run_id, run_name, _ = current_run()
        now = datetime.now(timezone.utc)
        record = RunRecord(id=f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}", database=database,
                           flow=flow, flow_run_id=run_id, flow_run_name=run_name)
        journal = cls(store, record)
        journal.save()
        return journal

    def save(self) -> None:
        self.record.updated_at = datetime.now(timezone.utc)
        self.store.put_bytes(self.record.key, self.record.model_dump_json(indent=2).encode())

    def note(self, step: str, **changes: object) -> None:
        """Record that `step` is about to happen (and what it will create or change)."""
        for name, value in changes.items():
            setattr(self.record, name, value)
        self.record.step = step
        self.save()

    def creating(self, dbname: str) -> None:
        """Record a database before it is created, so a crash cannot leave it unknown."""
        if dbname not in self.record.databases:
            self.record.databases.append(dbname)
        self.note(f"creating {dbname}")

    def finish(self, outcome: str) -> None:
        self.record.finished, self.record.outcome = True, outcome
        self.save()


def unfinished(store: Store, database: str) -> list[RunRecord]:
    """The records of `database` whose run never finished, oldest first."""
    out = []
    for obj in store.list(f"{PREFIX}/{database}/"):
        if not obj.key.endswith(".json"):
            continue
        try:
            record = RunRecord.model_validate_json(store.get_bytes(obj.key))
        except (ValueError, StoreError):
            continue
        if not record.finished and record.database == database:
            out.append(record)
    return sorted(out, key=lambda r: r.started_at)


def close(store: Store, record: RunRecord, outcome: str) -> None:
    """Mark a dead run's record settled (kept: it is the history of what happened)."""
    Journal(store, record).finish(outcome)
