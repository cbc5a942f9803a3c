"""The ledger's errors, and its one way into the database: :func:`begin` and :func:`connect`.

Every facade opens its transactions through these two, so whatever the database or its driver
raises leaves the ledger as one of its own errors, the original kept as ``__cause__``. Callers
then tell an outage (:class:`LedgerUnavailable`) from a refusal (:class:`LedgerError`) without
knowing SQLAlchemy, and nothing they log can carry a statement or its parameters.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine


class LedgerError(Exception):
    """A ledger operation that cannot be carried out as asked (unknown job, bad replay, schema not current)."""


class UnknownJob(LedgerError):
    """No job with this id is in the ledger."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r} in the ledger")
        self.job_id = job_id


class LedgerUnavailable(LedgerError):
    """The database failed the operation (unreachable, restarting, disk full, schema broken, a
    timeout): nothing of it was committed, and the same call may succeed later.

    Its text names only the driver's error class (``kind``), as every log line about an outage
    does; ``detail`` is the first line of the driver's own message (never a statement or its
    parameters), for the few places that show more: ``cos-webhook check``, a quarantined message.
    """

    def __init__(self, kind: str, detail: str = "", where: str = "") -> None:
        super().__init__(f"ledger unavailable ({kind})")
        self.kind = kind
        self.detail = detail
        self.where = where  # the database's URL, without its password


class LedgerRefused(LedgerUnavailable):
    """The database refused what was written (a value it cannot hold, a constraint it breaks): the
    same write fails again, however often it is tried. Where writers race for the same rows (two
    callbacks recording one job), the ledger resolves the race itself and never raises this for it.
    """


# SQLAlchemy's errors, and the drivers' own where the ledger works on the driver's connection (the
# SQLite write lock taken up front, PostgreSQL's one-statement ingest).
_DATABASE_ERRORS = (sa.exc.SQLAlchemyError, sqlite3.Error, psycopg.Error)
_REFUSALS = (sa.exc.IntegrityError, sa.exc.DataError, sqlite3.IntegrityError, psycopg.IntegrityError, psycopg.DataError)
# The kinds of database error every driver has (PEP 249): a driver's own subclass (psycopg's
# UndefinedTable) is named by the kind it is (ProgrammingError), as SQLAlchemy's wrapper would be.
_KINDS = frozenset({"InterfaceError", "DataError", "OperationalError", "IntegrityError", "InternalError",
                    "ProgrammingError", "NotSupportedError", "DatabaseError"})  # fmt: skip


def _ledger_error(exc: BaseException, engine: Engine) -> LedgerUnavailable:
    kind = next((cls.__name__ for cls in type(exc).__mro__ if cls.__name__ in _KINDS), type(exc).__name__)
    lines = str(exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc).splitlines()
    args = (kind, lines[0][:200] if lines else "", engine.url.render_as_string(hide_password=True))
    if isinstance(exc, _REFUSALS):
        return LedgerRefused(*args)
    return LedgerUnavailable(*args)


@contextmanager
def _translated(engine: Engine) -> Iterator[None]:
    """Raise what the database raises inside the block as the ledger's own error."""
    try:
        yield
    except _DATABASE_ERRORS as exc:
        raise _ledger_error(exc, engine) from exc


@contextmanager
def begin(engine: Engine) -> Iterator[Connection]:
    """A transaction, committed when the block ends (as ``engine.begin()``), failing as the ledger does."""
    with _translated(engine), engine.begin() as conn:
        yield conn


@contextmanager
def connect(engine: Engine) -> Iterator[Connection]:
    """A connection (as ``engine.connect()``), for reads or a transaction of its own, failing as the ledger does."""
    with _translated(engine), engine.connect() as conn:
        yield conn
