"""What operators read: jobs with their tasks, dead letters and counts (``jobs``, ``dead``, metrics)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from webhook.ledger.errors import UnknownJob, connect
from webhook.ledger.readable import (
    as_int,
    as_time,
    int_or_none,
    job_problem,
    task_kind,
    task_problem,
    time_or_none,
    tolerant,
    tolerant_select,
)
from webhook.ledger.schema import attempts, callbacks, jobs, tasks, versions
from webhook.ledger.view_records import AttemptView, DeadLetter, JobView, RawCallback, TaskView, VersionView
from webhook.models import JobStatus, TaskKind, TaskStatus, job_from_json


class Views:
    """Read-only queries; none takes a write lock."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def list_jobs(self, limit: int = 50, status: str | None = None) -> list[JobView]:
        query = tolerant_select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.job_id).limit(limit)
        if status:
            query = query.where(jobs.c.status == status)
        with connect(self._engine) as conn:
            return [_job_view(row, ()) for row in conn.execute(query)]

    def show_job(self, job_id: str) -> JobView:
        with connect(self._engine) as conn:
            row = conn.execute(tolerant_select(jobs).where(jobs.c.job_id == job_id)).first()
            if row is None:
                raise UnknownJob(job_id)
            task_rows = conn.execute(
                tolerant_select(tasks).where(tasks.c.job_id == job_id).order_by(tasks.c.kind.desc(), tasks.c.sink)
            ).all()
            version_rows = conn.execute(
                tolerant_select(versions).where(versions.c.job_id == job_id).order_by(versions.c.id)
            ).all()
            attempt_rows = conn.execute(
                tolerant_select(attempts).where(attempts.c.job_id == job_id).order_by(attempts.c.id)
            ).all()
        task_views = tuple(_task_view(t) for t in task_rows)
        version_views = tuple(_version_view(v) for v in version_rows)
        attempt_views = tuple(_attempt_view(a) for a in attempt_rows)
        view = _job_view(row, task_views, version_views)
        # What of the job's history cannot be read is said where the job's own problems are.
        found = [view.unreadable, *(v.unreadable for v in version_views), *(a.unreadable for a in attempt_views)]
        return replace(view, attempts=attempt_views, unreadable="; ".join(p for p in found if p))

    def raw_callbacks(self, job_id: str) -> list[RawCallback]:
        """Every stored request that named the job, oldest first."""
        named = sa.union(
            sa.select(versions.c.callback_id).where(versions.c.job_id == job_id),
            sa.select(jobs.c.callback_id).where(jobs.c.job_id == job_id),
        )
        holder = callbacks.alias("holder")  # the callback that keeps a repeated body
        query = (
            tolerant_select(callbacks)
            .add_columns(sa.func.coalesce(holder.c.body, callbacks.c.body).label("stored_body"))
            .select_from(callbacks.outerjoin(holder, holder.c.id == callbacks.c.body_of))
            .where(callbacks.c.id.in_(named))
            .order_by(callbacks.c.id)
        )
        with connect(self._engine) as conn:
            return [_raw_callback(r) for r in conn.execute(query)]

    def dead_letters(self, sink: str | None = None, since: datetime | None = None) -> list[DeadLetter]:
        """Tasks that died (verifications and deliveries), oldest first; ``sink`` keeps that sink's deliveries."""
        query = tolerant_select(tasks).where(tasks.c.status == TaskStatus.DEAD).order_by(tasks.c.done_at, tasks.c.id)
        if sink is not None:
            query = query.where(tasks.c.kind == TaskKind.DELIVER, tasks.c.sink == sink)
        if since is not None:
            query = query.where(tasks.c.done_at >= since)
        with connect(self._engine) as conn:
            return [_dead_letter(r) for r in conn.execute(query)]

    def rejected_jobs(self, since: datetime | None = None) -> list[str]:
        """Jobs verification refused (since ``since``, by when it did), oldest first."""
        query = sa.select(jobs.c.job_id).where(jobs.c.status == JobStatus.REJECTED).order_by(jobs.c.updated_at)
        if since is not None:
            query = query.where(jobs.c.updated_at >= since)
        with connect(self._engine) as conn:
            return list(conn.execute(query).scalars())

    def counts(self) -> dict[str, int]:
        """Jobs per status and due tasks, for health and metrics."""
        with connect(self._engine) as conn:
            rows = conn.execute(sa.select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)).all()
            pending = conn.execute(
                sa.select(sa.func.count()).select_from(tasks).where(tasks.c.status == TaskStatus.PENDING)
            ).scalar_one()
        out = {f"jobs_{status}": int(n) for status, n in rows}
        out["tasks_pending"] = int(pending)
        return out


def _job_view(row: Any, task_views: tuple[TaskView, ...], version_views: tuple[VersionView, ...] = ()) -> JobView:
    try:
        job, unreadable = job_from_json(row.detail), ""
    except ValueError as exc:
        job, unreadable = None, f"unreadable job row: {exc}"
    return JobView(
        job_id=row.job_id,
        tag=row.tag,
        event_name=row.event_name,
        state=row.state,
        status=str(row.status),
        reason=row.reason,
        created_at=time_or_none(jobs.c.created_at, row.created_at),
        updated_at=time_or_none(jobs.c.updated_at, row.updated_at),
        job=job,
        unreadable="; ".join(p for p in (unreadable, job_problem(row)) if p),
        tasks=task_views,
        versions=version_views,
    )


def _task_view(row: Any) -> TaskView:
    attempts, problem = int_or_none(tasks.c.attempts, row.attempts), task_problem(row)
    run_after, done_at = time_or_none(tasks.c.run_after, row.run_after), time_or_none(tasks.c.done_at, row.done_at)
    kind = task_kind(row)
    return TaskView(kind, row.sink or None, str(row.status), attempts, row.last_error, run_after, done_at, problem)


def _dead_letter(r: Any) -> DeadLetter:
    attempts, dead_at = int_or_none(tasks.c.attempts, r.attempts), time_or_none(tasks.c.done_at, r.done_at)
    return DeadLetter(task_kind(r), r.job_id, r.sink or None, attempts, r.last_error, dead_at)


def _version_view(v: Any) -> VersionView:
    received_at, problem = tolerant(as_time, versions.c.received_at, v.received_at)
    return VersionView(v.callback_id, received_at, str(v.status), v.reason, problem)


def _attempt_view(a: Any) -> AttemptView:
    started_at, duration_ms = (
        tolerant(as_time, attempts.c.started_at, a.started_at),
        tolerant(as_int, attempts.c.duration_ms, a.duration_ms),
    )
    problem = "; ".join(p for _, p in (started_at, duration_ms) if p)
    sink = a.sink or None
    return AttemptView(a.kind, sink, started_at[0], duration_ms[0], a.outcome, a.code, a.error, a.worker_id, problem)


def _raw_callback(r: Any) -> RawCallback:
    received_at, problem = tolerant(as_time, callbacks.c.received_at, r.received_at)
    return RawCallback(r.id, received_at, r.remote_addr, r.content_type, r.headers, r.stored_body, problem)
