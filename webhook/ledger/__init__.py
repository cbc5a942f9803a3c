"""The ledger: every callback, job and task, in SQLite or PostgreSQL.

``Ledger(url)`` holds the engine and what is done with it: :attr:`~Ledger.jobs` (record
callbacks, replay), :attr:`~Ledger.queue` (claim, lease, outcomes), :attr:`~Ledger.views` (what
operators read), :attr:`~Ledger.browse` (jobs page by page, recent activity),
:attr:`~Ledger.workers` (heartbeats, takeover),
:attr:`~Ledger.breakers` (each sink's circuit breaker), :attr:`~Ledger.locks`, :attr:`~Ledger.retention`,
:attr:`~Ledger.quarantine` and :attr:`~Ledger.stats` (the whole ledger at a glance: metrics,
overviews). The tables are in :mod:`webhook.ledger.schema` and stay inside this package: what the
database raises leaves it as :class:`LedgerUnavailable` (see :mod:`webhook.ledger.errors`). A
typed column holding what its type cannot is read row by row (:mod:`webhook.ledger.readable`):
that row's claim or view says which column, and every other row reads as usual.
:attr:`~Ledger.sessions` keeps the dashboard's logins.
"""

from __future__ import annotations

import sqlalchemy as sa

from webhook.ledger import migrate
from webhook.ledger.breakers import Breaker, Breakers
from webhook.ledger.browse import Browse, JobFilter, JobPage, JobRow, StepCounts
from webhook.ledger.claims import Attempt, Claim, Delivery, DeliveryClaim, Room, Task, Trying, VerifyClaim, Version
from webhook.ledger.engine import make_engine, read_only_engine
from webhook.ledger.errors import LedgerError, LedgerRefused, LedgerUnavailable, UnknownJob, connect
from webhook.ledger.jobs import Jobs, Replayed
from webhook.ledger.locks import Locks
from webhook.ledger.quarantine import KeptMessage, Quarantine
from webhook.ledger.queue import Queue
from webhook.ledger.readiness import Readiness
from webhook.ledger.recording import MAX_VERSIONS_PER_JOB, RawRequest, Recorded
from webhook.ledger.retention import Pruned, Retention
from webhook.ledger.schema import utc_text, utcnow
from webhook.ledger.sessions import Failures, Sessions, Standing
from webhook.ledger.stats import LedgerStats, Stats, TaskGroup
from webhook.ledger.view_records import AttemptView, DeadLetter, JobView, RawCallback, TaskView, VersionView
from webhook.ledger.views import Views
from webhook.ledger.workers import STALE_BEATS, TakenOver, Workers, WorkerView

__all__ = [
    "MAX_VERSIONS_PER_JOB",
    "STALE_BEATS",
    "Attempt",
    "AttemptView",
    "Breaker",
    "Breakers",
    "Claim",
    "DeadLetter",
    "Delivery",
    "DeliveryClaim",
    "Failures",
    "JobFilter",
    "JobPage",
    "JobRow",
    "JobView",
    "KeptMessage",
    "Ledger",
    "LedgerError",
    "LedgerRefused",
    "LedgerStats",
    "LedgerUnavailable",
    "Locks",
    "Pruned",
    "RawCallback",
    "RawRequest",
    "Readiness",
    "Recorded",
    "Replayed",
    "Room",
    "Sessions",
    "Standing",
    "Stats",
    "StepCounts",
    "TakenOver",
    "Task",
    "TaskGroup",
    "TaskView",
    "Trying",
    "UnknownJob",
    "VerifyClaim",
    "Version",
    "VersionView",
    "WorkerView",
    "Workers",
    "utc_text",
    "utcnow",
]


class Ledger:
    """The service's durable state, at ``url`` (``sqlite:///…`` or ``postgresql+psycopg://…``).

    ``read_only``: a ledger that is only read and creates nothing, not even a SQLite file (raises
    :class:`LedgerError` if that file does not exist), as ``cos-webhook check`` reads it.
    """

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        self.url = url
        self.engine = read_only_engine(url) if read_only else make_engine(url)
        self.jobs = Jobs(self.engine)
        self.queue = Queue(self.engine)
        self.views = Views(self.engine)
        self.browse = Browse(self.engine)
        self.locks = Locks(self.engine)
        self.workers = Workers(self.engine)
        self.retention = Retention(self.engine)
        self.stats = Stats(self.engine)
        self.quarantine = Quarantine(self.engine)
        self.sessions = Sessions(self.engine)
        self.breakers = Breakers(self.engine)

    def migrate(self) -> None:
        """Bring the schema to this version's head revision; safe when several processes start at once."""
        migrate.upgrade(self.engine)

    def schema_problem(self) -> str | None:
        """Why the schema is not what this version needs (e.g. "run cos-webhook migrate"), or None."""
        return migrate.schema_problem(self.engine)

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

    def readiness(self, timeout: float) -> Readiness:
        """A readiness check of its own (see :class:`Readiness`), answered within ``timeout`` seconds."""
        return Readiness(self.engine.url, timeout)

    def ping(self) -> None:
        """Raise :class:`LedgerUnavailable` unless the database answers."""
        with connect(self.engine) as conn:
            conn.execute(sa.text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
