"""The ledger: every callback, job and task, in SQLite or PostgreSQL.

``Ledger(url)`` holds the engine and what is done with it: :attr:`~Ledger.jobs` (record
callbacks, replay), :attr:`~Ledger.queue` (claim, lease, outcomes), :attr:`~Ledger.views` (what
operators read), :attr:`~Ledger.workers` (heartbeats, takeover), :attr:`~Ledger.locks` and
:attr:`~Ledger.stats` (the whole ledger at a glance: metrics, overviews).
The tables are in :mod:`webhook.ledger.schema`.
"""

from __future__ import annotations

import sqlalchemy as sa

from webhook.ledger import migrate
from webhook.ledger.claims import Attempt, Claim, Delivery, DeliveryClaim, Task, Trying, VerifyClaim, Version
from webhook.ledger.engine import make_engine
from webhook.ledger.jobs import Jobs, RawRequest, Recorded, Replayed
from webhook.ledger.locks import Locks
from webhook.ledger.quarantine import Quarantine
from webhook.ledger.queue import Queue
from webhook.ledger.retention import Pruned, Retention
from webhook.ledger.schema import LedgerError, utcnow
from webhook.ledger.stats import LedgerStats, Stats, TaskGroup
from webhook.ledger.views import AttemptView, DeadLetter, JobView, RawCallback, TaskView, VersionView, Views
from webhook.ledger.workers import TakenOver, Workers, WorkerView

__all__ = [
    "Attempt",
    "AttemptView",
    "Claim",
    "DeadLetter",
    "Delivery",
    "DeliveryClaim",
    "JobView",
    "Ledger",
    "LedgerError",
    "LedgerStats",
    "Locks",
    "Pruned",
    "RawCallback",
    "RawRequest",
    "Recorded",
    "Replayed",
    "Stats",
    "TakenOver",
    "Task",
    "TaskGroup",
    "TaskView",
    "Trying",
    "VerifyClaim",
    "Version",
    "VersionView",
    "WorkerView",
    "Workers",
    "utcnow",
]


class Ledger:
    """The service's durable state, at ``url`` (``sqlite:///…`` or ``postgresql+psycopg://…``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.jobs = Jobs(self.engine)
        self.queue = Queue(self.engine)
        self.views = Views(self.engine)
        self.locks = Locks(self.engine)
        self.workers = Workers(self.engine)
        self.retention = Retention(self.engine)
        self.stats = Stats(self.engine)
        self.quarantine = Quarantine(self.engine)

    def migrate(self) -> None:
        """Bring the schema to this version's head revision; safe when several processes start at once."""
        migrate.upgrade(self.engine)

    def schema_problem(self) -> str | None:
        """Why the schema is not what this version needs (e.g. "run cos-webhook migrate"), or None."""
        return migrate.problem(self.engine)

    def prepare(self, auto_migrate: bool) -> None:
        """Before a process serves: migrate when allowed (``WEBHOOK_AUTO_MIGRATE``), else refuse a
        schema that is not current, saying to run ``cos-webhook migrate``."""
        if auto_migrate:
            self.migrate()
        else:
            self.require_current_schema()

    def require_current_schema(self) -> None:
        """Raise :class:`LedgerError` unless the schema is at this version's head revision."""
        if (problem := self.schema_problem()) is not None:
            raise LedgerError(problem)

    def ping(self) -> None:
        """Raise unless the database answers."""
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
