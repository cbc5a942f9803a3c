"""Browsing the ledger: jobs page by page with filters, and what happened lately (the dashboard's pages)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from webhook.ledger.errors import connect
from webhook.ledger.readable import job_problem, time_or_none, tolerant_select
from webhook.ledger.schema import attempts, jobs, tasks
from webhook.models import Outcome, TaskKind, TaskStatus, job_from_json


@dataclass(frozen=True)
class JobFilter:
    """The jobs page's filters; empty means any."""

    status: str = ""
    state: str = ""  # CI's: Success, Failed, Cancel ...
    tag: str = ""
    sink: str = ""  # jobs with a delivery to this sink
    since: datetime | None = None  # created at or after
    until: datetime | None = None  # created before
    search: str = ""  # part of the JobId, the UserData, or any other value CI reported (an object's key)


@dataclass(frozen=True)
class JobRow:
    job_id: str
    tag: str
    state: str
    status: str
    reason: str
    user_data: str
    created_at: datetime | None  # None when the stored value cannot be read (``unreadable`` says why)
    updated_at: datetime | None
    unreadable: str = ""  # which typed columns of the row cannot be read, and their values


@dataclass(frozen=True)
class JobPage:
    rows: list[JobRow]
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


@dataclass
class StepCounts:
    """Attempts at one step (a sink's deliveries, verification or fetching) by how they ended."""

    step: str
    sink: str
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> int:
        return self.outcomes[Outcome.OK]

    @property
    def failed(self) -> int:
        return self.outcomes[Outcome.RETRY] + self.outcomes[Outcome.DEAD]


class Browse:
    """Read-only: none of these takes a write lock."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def find_jobs(self, wanted: JobFilter, page: int = 1, per_page: int = 50) -> JobPage:
        """One page of the jobs that match, newest first."""
        conditions = _conditions(wanted)
        listing = (
            tolerant_select(jobs)
            .where(*conditions)
            .order_by(jobs.c.created_at.desc(), jobs.c.job_id)
            .limit(per_page)
            .offset((max(page, 1) - 1) * per_page)
        )
        counting = sa.select(sa.func.count()).select_from(jobs).where(*conditions)
        with connect(self._engine) as conn:
            total = int(conn.execute(counting).scalar_one())
            rows = [_job_row(r) for r in conn.execute(listing)]
        return JobPage(rows, total, max(page, 1), per_page)

    def tags(self) -> list[str]:
        with connect(self._engine) as conn:
            return sorted(conn.execute(sa.select(jobs.c.tag).distinct()).scalars())

    def delivery_sinks(self) -> list[str]:
        """Every sink the ledger has deliveries for (one may no longer be configured)."""
        query = sa.select(tasks.c.sink).where(tasks.c.kind == TaskKind.DELIVER).distinct()
        with connect(self._engine) as conn:
            return sorted(conn.execute(query).scalars())

    def attempts_since(self, since: datetime) -> list[StepCounts]:
        """Attempts started since ``since``, per step and sink: deliveries, failures and the rest."""
        query = (
            sa.select(attempts.c.kind, attempts.c.sink, attempts.c.outcome, sa.func.count())
            .where(attempts.c.started_at >= since)
            .group_by(attempts.c.kind, attempts.c.sink, attempts.c.outcome)
        )
        counts: dict[tuple[str, str], StepCounts] = {}
        with connect(self._engine) as conn:
            for kind, sink, outcome, n in conn.execute(query):
                entry = counts.setdefault((kind, sink), StepCounts(kind, sink))
                entry.outcomes[outcome] += int(n)
        order = {"verify": 0, "fetch": 1, "deliver": 2}
        return sorted(counts.values(), key=lambda c: (order.get(c.step, 3), c.sink))

    def leases(self, now: datetime) -> dict[str, int]:
        """How many tasks each worker holds a lease on now."""
        query = (
            sa.select(tasks.c.locked_by, sa.func.count())
            .where(tasks.c.status == TaskStatus.PENDING, tasks.c.locked_by.is_not(None), tasks.c.locked_until > now)
            .group_by(tasks.c.locked_by)
        )
        with connect(self._engine) as conn:
            return {str(worker): int(n) for worker, n in conn.execute(query)}


def _conditions(wanted: JobFilter) -> list[sa.ColumnElement[bool]]:
    found: list[sa.ColumnElement[bool]] = []
    if wanted.status:
        found.append(jobs.c.status == wanted.status)
    if wanted.tag:
        found.append(jobs.c.tag == wanted.tag)
    if wanted.sink:
        delivered = sa.select(tasks.c.job_id).where(tasks.c.kind == TaskKind.DELIVER, tasks.c.sink == wanted.sink)
        found.append(jobs.c.job_id.in_(delivered))
    if wanted.since is not None:
        found.append(jobs.c.created_at >= wanted.since)
    if wanted.until is not None:
        found.append(jobs.c.created_at < wanted.until)
    if wanted.state:
        found.append(jobs.c.state == wanted.state)
    if wanted.search:
        # The stored job is JSON, non-ASCII escaped: the text searched for is escaped alike.
        escaped = json.dumps(wanted.search)[1:-1]
        found.append(
            sa.or_(
                jobs.c.job_id.contains(wanted.search, autoescape=True),
                jobs.c.detail.contains(escaped, autoescape=True),
            )
        )
    return found


def _job_row(r: Any) -> JobRow:
    created, updated = time_or_none(jobs.c.created_at, r.created_at), time_or_none(jobs.c.updated_at, r.updated_at)
    user_data, problem = _user_data(r.detail), job_problem(r)
    return JobRow(r.job_id, r.tag, r.state, str(r.status), r.reason, user_data, created, updated, problem)


def _user_data(detail: str) -> str:
    try:
        return job_from_json(detail).user_data
    except ValueError:
        return ""
