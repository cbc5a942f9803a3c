"""Leasing due tasks to a worker, inside the caller's transaction: the SQL behind
:meth:`~webhook.ledger.queue.Queue.claim` and behind going on from a verification to the job's
deliveries without handing them back to the queue first.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from webhook.ledger.claims import Claim, Delivery, DeliveryClaim, Task, VerifyClaim, Version
from webhook.ledger.schema import jobs, tasks, versions
from webhook.models import TaskKind, TaskStatus, VersionStatus

# Built once: a worker claims many times a second, and building a statement costs more than running it.
_now = sa.bindparam("now", type_=sa.DateTime)
_job_id = sa.bindparam("job_id", type_=sa.String)
_ids = sa.bindparam("ids", expanding=True, type_=sa.Integer)
_DUE = sa.and_(
    tasks.c.status == TaskStatus.PENDING,
    tasks.c.run_after <= _now,
    sa.or_(tasks.c.locked_until.is_(None), tasks.c.locked_until < _now),
)
_FIRST_DUE = (
    sa.select(tasks.c.id, tasks.c.job_id, tasks.c.kind)
    .where(_DUE)
    .order_by(tasks.c.run_after, tasks.c.id)
    .limit(sa.bindparam("limit", type_=sa.Integer))
    .with_for_update(skip_locked=True)
)
_DUE_DELIVERIES = (
    sa.select(tasks.c.id)
    .where(_DUE, tasks.c.job_id == _job_id, tasks.c.kind == TaskKind.DELIVER)
    .with_for_update(skip_locked=True)
)
_DELIVERED_TO = sa.select(tasks.c.sink).where(
    tasks.c.job_id == _job_id, tasks.c.kind == TaskKind.DELIVER, tasks.c.status == TaskStatus.DONE
)
_PENDING_VERSIONS = (
    sa.select(versions.c.id, versions.c.detail)
    .where(versions.c.job_id == _job_id, versions.c.status == VersionStatus.PENDING)
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
)
_LEASED = sa.select(tasks).where(tasks.c.id.in_(_ids)).order_by(tasks.c.sink)
_JOB = sa.select(jobs.c.detail, jobs.c.created_at).where(jobs.c.job_id == _job_id)


def claim_due(conn: Connection, worker_id: str, until: datetime, now: datetime, limit: int) -> list[Claim]:
    """Lease due work of up to ``limit`` jobs, oldest first: one claim per job."""
    rows = conn.execute(_FIRST_DUE, {"now": now, "limit": limit}).all()
    claims: list[Claim] = []
    seen: set[str] = set()
    for row in rows:
        if row.job_id in seen:  # its other due tasks wait: one claim per job at a time
            continue
        seen.add(row.job_id)
        if row.kind == TaskKind.VERIFY:
            claims.append(_lease_verify(conn, row.id, row.job_id, worker_id, until, now))
        elif (deliveries := lease_deliveries(conn, row.job_id, worker_id, until, now)) is not None:
            claims.append(deliveries)
    return claims


def lease_deliveries(
    conn: Connection, job_id: str, worker_id: str, until: datetime, now: datetime
) -> DeliveryClaim | None:
    """Lease every due delivery of ``job_id`` (None if none is): one fetch serves them all."""
    ids = list(conn.execute(_DUE_DELIVERIES, {"now": now, "job_id": job_id}).scalars())
    if not ids:
        return None
    rows = _lease(conn, ids, worker_id, until, now)
    job = conn.execute(_JOB, {"job_id": job_id}).one()
    delivered_to = conn.execute(_DELIVERED_TO, {"job_id": job_id}).scalars()
    deliveries = tuple(Delivery(r.id, r.job_id, TaskKind.DELIVER, r.attempts, r.sink) for r in rows)
    return DeliveryClaim(job.detail, deliveries, job.created_at, frozenset(delivered_to))


def _lease_verify(
    conn: Connection, task_id: int, job_id: str, worker_id: str, until: datetime, now: datetime
) -> VerifyClaim:
    (row,) = _lease(conn, [task_id], worker_id, until, now)
    job = conn.execute(_JOB, {"job_id": job_id}).one()
    pending = conn.execute(_PENDING_VERSIONS, {"job_id": job_id}).all()
    found = tuple(Version(v.id, v.detail) for v in pending) or (Version(None, job.detail),)
    return VerifyClaim(Task(task_id, job_id, TaskKind.VERIFY, row.attempts), found, job.created_at)


def _lease(
    conn: Connection, ids: Sequence[int], worker_id: str, until: datetime, now: datetime
) -> Sequence[sa.Row[Any, Any]]:
    conn.execute(_LEASE, {"ids": list(ids), "worker_id": worker_id, "until": until, "now": now})
    return conn.execute(_LEASED, {"ids": list(ids)}).all()
