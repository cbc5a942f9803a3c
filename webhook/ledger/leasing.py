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


def _due(now: datetime) -> sa.ColumnElement[bool]:
    return sa.and_(
        tasks.c.status == TaskStatus.PENDING,
        tasks.c.run_after <= now,
        sa.or_(tasks.c.locked_until.is_(None), tasks.c.locked_until < now),
    )


def claim_due(conn: Connection, worker_id: str, until: datetime, now: datetime, limit: int) -> list[Claim]:
    """Lease due work of up to ``limit`` jobs, oldest first: one claim per job."""
    rows = conn.execute(
        sa.select(tasks.c.id, tasks.c.job_id, tasks.c.kind)
        .where(_due(now))
        .order_by(tasks.c.run_after, tasks.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
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
    ids = list(
        conn.execute(
            sa.select(tasks.c.id)
            .where(_due(now), tasks.c.job_id == job_id, tasks.c.kind == TaskKind.DELIVER)
            .with_for_update(skip_locked=True)
        ).scalars()
    )
    if not ids:
        return None
    rows = _lease(conn, ids, worker_id, until, now)
    job = _job(conn, job_id)
    delivered_to = conn.execute(
        sa.select(tasks.c.sink).where(
            tasks.c.job_id == job_id, tasks.c.kind == TaskKind.DELIVER, tasks.c.status == TaskStatus.DONE
        )
    ).scalars()
    deliveries = tuple(Delivery(r.id, r.job_id, TaskKind.DELIVER, r.attempts, r.sink) for r in rows)
    return DeliveryClaim(job.detail, deliveries, job.created_at, frozenset(delivered_to))


def _lease_verify(
    conn: Connection, task_id: int, job_id: str, worker_id: str, until: datetime, now: datetime
) -> VerifyClaim:
    (row,) = _lease(conn, [task_id], worker_id, until, now)
    job = _job(conn, job_id)
    pending = conn.execute(
        sa.select(versions.c.id, versions.c.detail)
        .where(versions.c.job_id == job_id, versions.c.status == VersionStatus.PENDING)
        .order_by(versions.c.id)
    ).all()
    found = tuple(Version(v.id, v.detail) for v in pending) or (Version(None, job.detail),)
    return VerifyClaim(Task(task_id, job_id, TaskKind.VERIFY, row.attempts), found, job.created_at)


def _lease(
    conn: Connection, ids: Sequence[int], worker_id: str, until: datetime, now: datetime
) -> Sequence[sa.Row[Any, Any]]:
    conn.execute(
        tasks.update()
        .where(tasks.c.id.in_(ids))
        .values(locked_by=worker_id, locked_until=until, attempts=tasks.c.attempts + 1, updated_at=now)
    )
    return conn.execute(sa.select(tasks).where(tasks.c.id.in_(ids)).order_by(tasks.c.sink)).all()


def _job(conn: Connection, job_id: str) -> sa.Row[Any, Any]:
    return conn.execute(sa.select(jobs.c.detail, jobs.c.created_at).where(jobs.c.job_id == job_id)).one()
