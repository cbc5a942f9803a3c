"""The ledger: every callback, job and task, in SQLite or PostgreSQL.

``Ledger(url)`` holds the engine and what is done with it: :attr:`~Ledger.jobs` (record
callbacks, replay), :attr:`~Ledger.queue` (claim, lease, outcomes), :attr:`~Ledger.views` (what
operators read), :attr:`~Ledger.workers` (heartbeats, takeover) and :attr:`~Ledger.locks`.
The tables are in :mod:`webhook.ledger.schema`.
"""

from __future__ import annotations

import sqlalchemy as sa

from webhook.ledger.claims import Attempt, Claim, Delivery, DeliveryClaim, Task, Trying, VerifyClaim, Version
from webhook.ledger.jobs import Jobs, RawRequest, Recorded, Replayed
from webhook.ledger.locks import Locks
from webhook.ledger.queue import Queue
from webhook.ledger.schema import LedgerError, create_schema, make_engine, utcnow
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
    "Locks",
    "RawCallback",
    "RawRequest",
    "Recorded",
    "Replayed",
    "TakenOver",
    "Task",
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

    def create_schema(self) -> None:
        """Create missing tables; safe when several processes start at once."""
        create_schema(self.engine)

    def ping(self) -> None:
        """Raise unless the database answers."""
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
