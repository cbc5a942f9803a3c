"""Reading typed columns one row at a time, so one bad value spoils its own row and nothing else.

SQLite keeps whatever text a hand-edit or a bug writes into a DateTime or Integer column, and
SQLAlchemy's own conversion of such a value raises in the middle of fetching a whole batch. The
columns read here are therefore fetched as they are stored (:func:`raw`) and converted per row in
Python (:func:`as_time`, :func:`as_int`, :func:`as_choice`), which raise :class:`Unreadable`
naming the column and the value. PostgreSQL refuses bad times and integers itself, but a status
string can hold anything on both.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa

from webhook.ledger.schema import jobs, tasks
from webhook.models import JobStatus, TaskKind, TaskStatus

T = TypeVar("T")

# A value is quoted in the reason only this far: the reason is stored and shown.
_SHOWN = 80
_now = sa.bindparam("now", type_=sa.DateTime)


class Unreadable(ValueError):
    """A stored value its column's type cannot hold."""

    def __init__(self, column: sa.Column[Any], value: object) -> None:
        self.where = f"{column.table.name}.{column.name}"
        super().__init__(f"unreadable {self.where}: {str(value)[:_SHOWN]}")


def raw(column: sa.Column[Any]) -> sa.Label[Any]:
    """``column`` as stored, under its own name: no conversion by SQLAlchemy that could raise."""
    return sa.type_coerce(column, sa.String).label(column.name)


def as_time(column: sa.Column[Any], value: object) -> datetime:
    if isinstance(value, datetime):  # PostgreSQL's driver converts timestamps itself
        return value
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:  # the ledger's times are naive UTC: an offset is not one of them
                return parsed
    raise Unreadable(column, value)


def as_optional_time(column: sa.Column[Any], value: object) -> datetime | None:
    return None if value is None else as_time(column, value)


def as_int(column: sa.Column[Any], value: object) -> int:
    # bool is an int to Python, never to a ledger column
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise Unreadable(column, value)


def as_choice(column: sa.Column[Any], value: object, choices: type[enum.StrEnum]) -> str:
    if isinstance(value, str) and value in choices.__members__.values():
        return value
    raise Unreadable(column, value)


def tolerant(convert: Callable[..., T], column: sa.Column[Any], value: object, *args: Any) -> tuple[T | None, str]:
    """``convert(column, value, *args)``, or None and why it cannot be."""
    try:
        return convert(column, value, *args), ""
    except Unreadable as exc:
        return None, str(exc)


def time_or_none(column: sa.Column[Any], value: object) -> datetime | None:
    """``value`` as a time; None when there is none or it cannot be read (the row's problem says which)."""
    return tolerant(as_optional_time, column, value)[0]


def int_or_none(column: sa.Column[Any], value: object) -> int | None:
    return tolerant(as_int, column, value)[0]


def tolerant_select(table: sa.Table) -> sa.Select[Any]:
    """Every column of ``table``, the typed ones that could hold a bad value as stored (see :func:`raw`)."""
    return sa.select(*(raw(c) if _risky(c) else c for c in table.c))


def _risky(column: sa.Column[Any]) -> bool:
    typed = isinstance(column.type, sa.DateTime | sa.Integer) and not column.primary_key and not column.foreign_keys
    return typed or column.name == "status"


def job_problem(row: Any) -> str:
    """What of a ``jobs`` row read with :data:`JOB_COLUMNS` cannot be read, "; "-separated ("" if all can)."""
    return _problems(
        (as_time, jobs.c.created_at, row.created_at),
        (as_time, jobs.c.updated_at, row.updated_at),
        (as_choice, jobs.c.status, row.status, JobStatus),
    )


def task_problem(row: Any) -> str:
    """What of a ``tasks`` row read with :data:`TASK_COLUMNS` cannot be read, "; "-separated ("" if all can)."""
    return _problems(
        (as_choice, tasks.c.kind, row.kind, TaskKind),
        (as_choice, tasks.c.status, row.status, TaskStatus),
        (as_int, tasks.c.attempts, row.attempts),
        (as_time, tasks.c.run_after, row.run_after),
        (as_optional_time, tasks.c.locked_until, row.locked_until),
        (as_optional_time, tasks.c.done_at, row.done_at),
    )


def task_kind(row: Any) -> TaskKind:
    """The kind of a ``tasks`` row; one that cannot be read is told by the row's sink (a delivery has
    one, a verification none), and :func:`task_problem` names it."""
    kind, _ = tolerant(as_choice, tasks.c.kind, row.kind, TaskKind)
    if kind is not None:
        return TaskKind(kind)
    return TaskKind.DELIVER if row.sink else TaskKind.VERIFY


def _problems(*reads: tuple[Any, ...]) -> str:
    return "; ".join(problem for _, problem in (tolerant(*read) for read in reads) if problem)


def broken_tasks(dialect: str) -> sa.ColumnElement[bool]:
    """Tasks not finished whose own typed columns a claim could not read or would never find due
    (a status no claim asks for, a kind no lane asks for).

    Such a row is leased anyway (see :mod:`webhook.ledger.leasing`) so that it becomes a dead task
    with its reason instead of waiting for ever or stopping the lease query.
    """
    unknown_status = _none_of(tasks.c.status, TaskStatus)
    unknown_kind = sa.and_(tasks.c.status == TaskStatus.PENDING, _none_of(tasks.c.kind, TaskKind))
    # A task leased to a worker is that worker's until the lease runs out (on PostgreSQL, SKIP LOCKED
    # also passes over a claim still being made; SQLite has no row locks).
    unleased = sa.or_(tasks.c.locked_until.is_(None), tasks.c.locked_until < _now)
    if dialect != "sqlite":  # PostgreSQL's own types keep bad times and integers out
        return sa.and_(sa.or_(unknown_status, unknown_kind), unleased)
    unleased = sa.or_(unleased, _not_time(tasks.c.locked_until))  # a lease that cannot be read is none
    bad_columns = sa.or_(
        sa.func.typeof(tasks.c.attempts) != "integer",
        _not_time(tasks.c.run_after),
        sa.and_(tasks.c.locked_until.is_not(None), _not_time(tasks.c.locked_until)),
    )
    bad_pending = sa.and_(tasks.c.status == TaskStatus.PENDING, bad_columns)
    return sa.and_(sa.or_(unknown_status, unknown_kind, bad_pending), unleased)


def _none_of(column: sa.Column[str], choices: type[enum.StrEnum]) -> sa.ColumnElement[bool]:
    """``column`` holds none of ``choices``, written as the ranges between them (``< 'dead' OR >
    'dead' AND < 'done' …``): an index on the column finds the (almost never any) rows in those
    ranges at once, where NOT IN would read every row, and claims run this whenever the queue is idle."""
    # Written into the statement, not bound: a plan made once for any value could not use the index.
    values = [sa.literal_column(f"'{value}'", sa.String) for value in sorted(choices.__members__.values())]
    ranges = [column < values[0], column > values[-1]]
    ranges += [sa.and_(column > low, column < high) for low, high in itertools.pairwise(values)]
    return sa.or_(*ranges)


def _not_time(column: sa.Column[Any]) -> sa.ColumnElement[bool]:
    # SQLAlchemy stores SQLite times as ISO text; anything else SQLite's datetime() cannot read.
    return sa.or_(sa.func.typeof(column) != "text", sa.func.datetime(column).is_(None))


# The typed columns a reader of each table fetches raw and converts with the functions above.
JOB_COLUMNS = (raw(jobs.c.created_at), raw(jobs.c.updated_at), raw(jobs.c.status))
_TASK_TYPED = (tasks.c.status, tasks.c.attempts, tasks.c.run_after, tasks.c.locked_until, tasks.c.done_at)
TASK_COLUMNS = tuple(raw(c) for c in _TASK_TYPED)
