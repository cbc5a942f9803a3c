"""Leasing due tasks to a worker, inside the caller's transaction: the SQL behind
:meth:`~webhook.ledger.queue.Queue.claim`, and the leasing that a worker's lanes
(:mod:`webhook.ledger.lanes`) build on.

A batch of jobs is leased in a fixed number of statements, however many jobs it holds: on
PostgreSQL each statement is a round trip, and a worker's claims wait on them.

A task or job row with a typed column that cannot be read (see :mod:`webhook.ledger.readable`)
is leased too, as a claim naming the column: the pipeline makes that task dead with the reason,
and the rest of the batch is claimed as usual.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from webhook.ledger.claims import Claim, Delivery, DeliveryClaim, Task, VerifyClaim, Version
from webhook.ledger.readable import (
    JOB_COLUMNS,
    TASK_COLUMNS,
    broken_tasks,
    int_or_none,
    job_problem,
    task_kind,
    task_problem,
    time_or_none,
)
from webhook.ledger.schema import jobs, tasks, versions
from webhook.models import TaskKind, TaskStatus, VersionStatus

# Built once: a worker claims many times a second, and building a statement costs more than running it.
_now = sa.bindparam("now", type_=sa.DateTime)
_ids = sa.bindparam("ids", expanding=True, type_=sa.Integer)
_job_ids = sa.bindparam("job_ids", expanding=True, type_=sa.String)
DUE = sa.and_(
    tasks.c.status == TaskStatus.PENDING,
    tasks.c.run_after <= _now,
    sa.or_(tasks.c.locked_until.is_(None), tasks.c.locked_until < _now),
)
_FIRST_DUE = (
    sa.select(tasks.c.id, tasks.c.job_id, tasks.c.kind, tasks.c.sink, *TASK_COLUMNS)
    .where(DUE)
    .order_by(tasks.c.run_after, tasks.c.id)
    .limit(sa.bindparam("limit", type_=sa.Integer))
    .with_for_update(skip_locked=True)
)
_DUE_DELIVERIES = (
    sa.select(tasks.c.id)
    .where(DUE, tasks.c.job_id.in_(_job_ids), tasks.c.kind == TaskKind.DELIVER)
    .with_for_update(skip_locked=True)
)
_DELIVERIES_OF = sa.select(tasks.c.job_id, tasks.c.sink, tasks.c.status).where(
    tasks.c.job_id.in_(_job_ids), tasks.c.kind == TaskKind.DELIVER
)
_PENDING_VERSIONS = (
    sa.select(versions.c.job_id, versions.c.id, versions.c.detail)
    .where(versions.c.job_id.in_(_job_ids), versions.c.status == VersionStatus.PENDING)
    .order_by(versions.c.id)
)
_LEASE = (
    tasks.update()
    .where(tasks.c.id.in_(_ids))
    .values(
        locked_by=sa.bindparam("worker_id"),
        locked_until=sa.bindparam("until"),
        attempts=tasks.c.attempts + 1,
        updated_at=_now,
    )
    .returning(tasks.c.id, tasks.c.job_id, tasks.c.kind, tasks.c.sink, tasks.c.attempts)
)
# The job's typed columns are read raw: one row that cannot be read is that job's claim's problem.
_JOBS = sa.select(jobs.c.job_id, jobs.c.detail, *JOB_COLUMNS).where(jobs.c.job_id.in_(_job_ids))
BROKEN = {
    dialect: sa.select(tasks.c.id, tasks.c.job_id, tasks.c.kind, tasks.c.sink, *TASK_COLUMNS)
    .where(broken_tasks(dialect))
    .order_by(tasks.c.id)
    .limit(sa.bindparam("limit", type_=sa.Integer))
    .with_for_update(skip_locked=True)
    for dialect in ("postgresql", "sqlite")
}
_LEASE_BROKEN = (
    tasks.update()
    .where(tasks.c.id == sa.bindparam("task_id"))
    # Readable values again, so that closing the task works as for any other; the bad value is
    # kept in the reason the task dies with.
    .values(kind=sa.bindparam("kind"), status=TaskStatus.PENDING, attempts=sa.bindparam("attempts"), run_after=_now,
            locked_by=sa.bindparam("worker_id"), locked_until=sa.bindparam("until"), updated_at=_now)
)  # fmt: skip
# A kind that cannot be read is put right (readable.task_kind) unless the job has that task already.
_TWIN = sa.select(tasks.c.id).where(
    tasks.c.job_id == sa.bindparam("job_id"), tasks.c.kind == sa.bindparam("kind"), tasks.c.sink == sa.bindparam("sink")
)


def claim_due(conn: Connection, worker_id: str, until: datetime, now: datetime, limit: int) -> list[Claim]:
    """Lease due work of up to ``limit`` jobs, oldest first: one claim per job."""
    first: dict[str, tuple[int, str]] = {}  # job id -> its oldest due task (id, kind)
    unreadable: list[Any] = []  # due, but a column of theirs cannot be read
    for row in conn.execute(_FIRST_DUE, {"now": now, "limit": limit}):
        if task_problem(row):
            unreadable.append(row)
        else:  # A job's other due tasks wait: one claim per job at a time.
            first.setdefault(row.job_id, (row.id, row.kind))
    verify = [task_id for task_id, kind in first.values() if kind == TaskKind.VERIFY]
    deliver = [job_id for job_id, (_, kind) in first.items() if kind == TaskKind.DELIVER]
    due = _due_deliveries(conn, deliver, now)
    claims = lease_tasks(conn, verify + due, worker_id, until, now)
    found = [claims[job_id] for job_id in first if job_id in claims]
    if len(found) + len(unreadable) < limit:
        # Rows never due (a bad run_after or status) are looked for only when there is room, so
        # that a busy queue does not pay for the search on every claim.
        more = {"limit": limit - len(found) - len(unreadable), "now": now}
        unreadable += conn.execute(BROKEN[conn.dialect.name], more).all()
    return found + lease_unreadable(conn, unreadable, set(claims), worker_id, until, now)


def deliveries_of(job_id: str, leased: Sequence[sa.Row[Any]]) -> tuple[Delivery, ...]:
    """A claim's deliveries, in the order of their sinks' names."""
    ordered = sorted(leased, key=lambda r: str(r.sink))
    return tuple(Delivery(r.id, job_id, TaskKind.DELIVER, r.attempts, r.sink) for r in ordered)


def _due_deliveries(conn: Connection, job_ids: Collection[str], now: datetime) -> list[int]:
    if not job_ids:
        return []
    return list(conn.execute(_DUE_DELIVERIES, {"now": now, "job_ids": list(job_ids)}).scalars())


def lease_tasks(
    conn: Connection, ids: Sequence[int], worker_id: str, until: datetime, now: datetime
) -> dict[str, Claim]:
    """Lease the tasks ``ids`` and build one claim per job from them (verify tasks stand alone)."""
    if not ids:
        return {}
    leased = conn.execute(_LEASE, {"ids": list(ids), "worker_id": worker_id, "until": until, "now": now}).all()
    by_job: dict[str, list[sa.Row[Any]]] = defaultdict(list)
    for row in leased:
        by_job[row.job_id].append(row)
    job_ids = list(by_job)
    found = {row.job_id: row for row in conn.execute(_JOBS, {"job_ids": job_ids})}
    verifying = [job_id for job_id, rows in by_job.items() if rows[0].kind == TaskKind.VERIFY]
    delivering = [job_id for job_id in job_ids if job_id not in verifying]
    pending = _grouped(conn, _PENDING_VERSIONS, verifying)
    deliveries = _grouped(conn, _DELIVERIES_OF, delivering)
    claims: dict[str, Claim] = {}
    for job_id, rows in by_job.items():
        job = found[job_id]
        received_at, problem = _received(job, now)
        if rows[0].kind == TaskKind.VERIFY:
            (row,) = rows  # a job's verify task is leased alone
            mine = tuple(Version(v.id, v.detail) for v in pending.get(job_id, ())) or (Version(None, job.detail),)
            task = Task(row.id, job_id, TaskKind.VERIFY, row.attempts)
            claims[job_id] = VerifyClaim(task, mine, received_at, problem)
        else:
            in_claim = {r.sink for r in rows}
            of_job = deliveries.get(job_id, ())
            done = frozenset(r.sink for r in of_job if r.status == TaskStatus.DONE)
            waiting = frozenset(r.sink for r in of_job if r.status == TaskStatus.PENDING and r.sink not in in_claim)
            claims[job_id] = DeliveryClaim(
                job.detail, deliveries_of(job_id, rows), received_at, done, waiting, unreadable=problem
            )
    return claims


def _received(job: Any, now: datetime) -> tuple[datetime, str]:
    """When the job was received (now, if that cannot be read) and why its row cannot be used ("" if it can)."""
    if job is None:
        return now, "unreadable jobs row: missing"
    return time_or_none(jobs.c.created_at, job.created_at) or now, job_problem(job)


def lease_unreadable(
    conn: Connection, rows: Sequence[Any], taken: set[str], worker_id: str, until: datetime, now: datetime
) -> list[Claim]:
    """Lease the unfinished tasks ``rows`` whose own columns cannot be read, one per job not in
    ``taken``: each becomes a claim the pipeline makes dead with the reason."""
    rows = [r for r in rows if r.job_id not in taken]
    found = {r.job_id: r for r in conn.execute(_JOBS, {"job_ids": list({r.job_id for r in rows})})} if rows else {}
    claims: dict[str, Claim] = {}
    for row in rows:
        if row.job_id in claims:
            continue  # one claim per job: its next broken task in a later claim
        attempts = (int_or_none(tasks.c.attempts, row.attempts) or 0) + 1  # as a claim counts its own attempt
        kind = task_kind(row)
        twin = {"job_id": row.job_id, "kind": kind, "sink": row.sink}
        stored = kind if kind == row.kind or conn.execute(_TWIN, twin).first() is None else row.kind
        params = {"task_id": row.id, "attempts": attempts, "worker_id": worker_id, "until": until, "now": now}
        conn.execute(_LEASE_BROKEN, params | {"kind": stored})
        received_at, _ = _received(found.get(row.job_id), now)
        reason = task_problem(row) or "unreadable tasks row"
        if kind == TaskKind.VERIFY:
            task = Task(row.id, row.job_id, TaskKind.VERIFY, attempts)
            claims[row.job_id] = VerifyClaim(task, (), received_at, reason)
        else:
            delivery = Delivery(row.id, row.job_id, TaskKind.DELIVER, attempts, row.sink)
            claims[row.job_id] = DeliveryClaim("", (delivery,), received_at, unreadable=reason)
    return list(claims.values())


def _grouped(conn: Connection, statement: sa.Select[Any], job_ids: list[str]) -> dict[str, list[sa.Row[Any]]]:
    """The rows of ``statement`` for ``job_ids``, by job; no statement at all when there is no job."""
    rows: dict[str, list[sa.Row[Any]]] = defaultdict(list)
    if job_ids:
        for row in conn.execute(statement, {"job_ids": job_ids}):
            rows[row.job_id].append(row)
    return rows
