"""Making a job's tasks due, and setting its status, inside the caller's transaction.

Recording a callback (on SQLite), replaying a job and closing a task's outcome all change a job
this way; the caller holds the job row's lock where two writers could meet.

Every transaction that writes both takes the locks in one order, so that no two can each wait on
the other: jobs first, in job id order, then tasks, in task id order (:func:`in_id_order` for a
statement that writes several tasks).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from webhook.ledger.schema import JOB_WIDE, jobs, tasks, versions
from webhook.models import JobState, JobStatus, TaskKind, TaskStatus, VersionStatus, job_from_json


def schedule(conn: Connection, job_id: str, kind: TaskKind, sink: str | None, now: datetime) -> None:
    """Make the job's task of ``kind`` (for ``sink``) due now with a fresh budget, creating it if needed."""
    row = task_row(job_id, kind, sink, now)
    which = (tasks.c.job_id == job_id, tasks.c.kind == kind, tasks.c.sink == row["sink"])
    fresh = {"locked_by": None, "locked_until": None, "done_at": None} | row
    if not conn.execute(tasks.update().where(*which).values(fresh)).rowcount:
        conn.execute(tasks.insert().values(row))


def in_id_order(which: sa.ColumnElement[bool], *, skip_locked: bool = False) -> sa.ColumnElement[bool]:
    """The tasks ``which``, locked in id order before an UPDATE writes them (an UPDATE alone locks its
    rows in the order it finds them on disk). ``skip_locked``: leave out rows another transaction holds
    instead of waiting for them. (SQLite has no row locks: its writers take turns.)"""
    ordered = sa.select(tasks.c.id).where(which).order_by(tasks.c.id).with_for_update(skip_locked=skip_locked)
    return tasks.c.id.in_(ordered.scalar_subquery())


def set_status(conn: Connection, job_id: str, status: JobStatus, reason: str, now: datetime) -> None:
    conn.execute(jobs.update().where(jobs.c.job_id == job_id).values(status=status, reason=reason, updated_at=now))


def reverify(conn: Connection, job_id: str, now: datetime) -> None:
    """Verify every version of the job again from scratch: CI's answer or the allowlist may have changed.
    Versions past the job's cap (capped) stay unverified."""
    again = versions.update().where(versions.c.job_id == job_id, versions.c.status != VersionStatus.CAPPED)
    conn.execute(again.values(status=VersionStatus.PENDING, reason=""))
    schedule(conn, job_id, TaskKind.VERIFY, None, now)
    set_status(conn, job_id, JobStatus.RECEIVED, "", now)


def unverified(conn: Connection, job_id: str, status: str) -> bool:
    """Rejected, or dead before any delivery was scheduled (its verification gave up)."""
    if status == JobStatus.REJECTED:
        return True
    if status != JobStatus.DEAD:
        return False
    deliveries = sa.select(tasks.c.id).where(tasks.c.job_id == job_id, tasks.c.kind == TaskKind.DELIVER)
    return conn.execute(deliveries.limit(1)).first() is None


def task_row(job_id: str, kind: TaskKind, sink: str | None, now: datetime) -> dict[str, Any]:
    """A task due now with a fresh budget, as a row in ``tasks``."""
    return {"job_id": job_id, "kind": kind, "sink": JOB_WIDE if sink is None else sink, "status": TaskStatus.PENDING,
            "attempts": 0, "run_after": now, "last_error": "", "updated_at": now}  # fmt: skip


def settle(conn: Connection, job_id: str, now: datetime) -> None:
    """Derive the job's status from its deliveries once none is pending (the caller holds the job's lock).

    All delivered is ``delivered``, or ``failed`` for a job CI reports did not succeed (its
    failure event is what was delivered), with CI's code and message as the reason.
    """
    rows = conn.execute(
        sa.select(tasks.c.status, tasks.c.sink, tasks.c.last_error)
        .where(tasks.c.job_id == job_id, tasks.c.kind == TaskKind.DELIVER)
        .order_by(tasks.c.sink)
    ).all()
    if any(row.status == TaskStatus.PENDING for row in rows):
        return
    # Sinks' own errors start with the sink's name; other errors get it in front.
    dead = [
        row.last_error if row.last_error.startswith(f"{row.sink}: ") else f"{row.sink}: {row.last_error}"
        for row in rows
        if row.status == TaskStatus.DEAD
    ]
    if dead:
        set_status(conn, job_id, JobStatus.DEAD, "dead deliveries: " + "; ".join(dead), now)
    elif failure := _ci_failure(conn, job_id):
        set_status(conn, job_id, JobStatus.FAILED, failure, now)
    else:
        set_status(conn, job_id, JobStatus.DELIVERED, "", now)


def _ci_failure(conn: Connection, job_id: str) -> str:
    """Why CI says the job did not succeed, from its stored account ("" if it succeeded)."""
    row = conn.execute(sa.select(jobs.c.state, jobs.c.detail).where(jobs.c.job_id == job_id)).one()
    if row.state == JobState.SUCCESS:
        return ""
    try:
        return job_from_json(row.detail).failure
    except ValueError:  # the state column alone still says it failed
        return f"CI reports {row.state}"
