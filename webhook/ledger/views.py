"""What operators read: jobs with their tasks, dead letters and counts (``jobs``, ``dead``, metrics)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from webhook.ledger.errors import UnknownJob, connect
from webhook.ledger.readable import int_or_none, job_problem, task_problem, time_or_none, tolerant_select
from webhook.ledger.schema import attempts, callbacks, jobs, tasks, versions
from webhook.models import Job, JobStatus, TaskKind, TaskStatus, job_from_json, job_to_dict


@dataclass(frozen=True)
class DeadLetter:
    """A task that ran out of attempts (or was refused for good): a verification or a delivery."""

    kind: str  # "verify" or "deliver"
    job_id: str
    sink: str | None  # None for a verification
    attempts: int | None  # None (and dead_at too) when the stored value cannot be read
    last_error: str
    dead_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"dead_at": _iso(self.dead_at)}


@dataclass(frozen=True)
class TaskView:
    kind: str
    sink: str | None  # None for a verify task
    status: str
    attempts: int | None  # None (and the times too) when the stored value cannot be read
    last_error: str
    run_after: datetime | None
    done_at: datetime | None
    unreadable: str = ""  # which of the row's columns cannot be read, and its value

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sink": self.sink} if self.kind == TaskKind.DELIVER else {}
        out |= {
            "status": self.status,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "next_attempt_at": _iso(self.run_after) if self.status == TaskStatus.PENDING else None,
            "done_at": _iso(self.done_at),
        }
        return out | ({"unreadable": self.unreadable} if self.unreadable else {})


@dataclass(frozen=True)
class VersionView:
    """What one callback said about the job, and what verification made of it."""

    callback_id: int
    received_at: datetime
    status: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"received_at": _iso(self.received_at)}


@dataclass(frozen=True)
class AttemptView:
    """One try at a step, in the job's timeline."""

    step: str  # verify, fetch, deliver
    sink: str | None  # None for verify and fetch
    started_at: datetime
    duration_ms: int
    outcome: str
    code: str
    error: str
    worker_id: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"started_at": _iso(self.started_at)}


@dataclass(frozen=True)
class RawCallback:
    """A stored request that named the job, as it arrived (or as reconcile found the job)."""

    id: int
    received_at: datetime
    remote_addr: str
    content_type: str
    headers: str  # JSON
    body: bytes


@dataclass(frozen=True)
class JobView:
    job_id: str
    tag: str
    event_name: str
    state: str
    status: str
    reason: str
    created_at: datetime | None  # None when the stored value cannot be read (``unreadable`` says why)
    updated_at: datetime | None
    job: Job | None  # None when the stored detail cannot be read (``unreadable`` says why)
    unreadable: str = ""  # what of the row cannot be read, each "; "-separated
    tasks: tuple[TaskView, ...] = ()
    versions: tuple[VersionView, ...] = ()
    attempts: tuple[AttemptView, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "tag": self.tag,
            "event_name": self.event_name,
            "state": self.state,
            "status": self.status,
            "reason": self.reason,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "verify": [t.to_dict() for t in self.tasks if t.kind == TaskKind.VERIFY],
            "deliveries": [t.to_dict() for t in self.tasks if t.kind == TaskKind.DELIVER],
            "callbacks": [v.to_dict() for v in self.versions],
            "attempts": [a.to_dict() for a in self.attempts],
            "detail": job_to_dict(self.job) if self.job else None,
            "unreadable": self.unreadable or None,
        }


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
                sa.select(versions).where(versions.c.job_id == job_id).order_by(versions.c.id)
            ).all()
            attempt_rows = conn.execute(
                sa.select(attempts).where(attempts.c.job_id == job_id).order_by(attempts.c.id)
            ).all()
        task_views = tuple(_task_view(t) for t in task_rows)
        version_views = tuple(VersionView(v.callback_id, v.received_at, v.status, v.reason) for v in version_rows)
        attempt_views = tuple(
            AttemptView(a.kind, a.sink or None, a.started_at, a.duration_ms, a.outcome, a.code, a.error, a.worker_id)
            for a in attempt_rows
        )
        return replace(_job_view(row, task_views, version_views), attempts=attempt_views)

    def raw_callbacks(self, job_id: str) -> list[RawCallback]:
        """Every stored request that named the job, oldest first."""
        named = sa.union(
            sa.select(versions.c.callback_id).where(versions.c.job_id == job_id),
            sa.select(jobs.c.callback_id).where(jobs.c.job_id == job_id),
        )
        holder = callbacks.alias("holder")  # the callback that keeps a repeated body
        query = (
            sa.select(callbacks, sa.func.coalesce(holder.c.body, callbacks.c.body).label("stored_body"))
            .outerjoin(holder, holder.c.id == callbacks.c.body_of)
            .where(callbacks.c.id.in_(named))
            .order_by(callbacks.c.id)
        )
        with connect(self._engine) as conn:
            return [
                RawCallback(r.id, r.received_at, r.remote_addr, r.content_type, r.headers, r.stored_body)
                for r in conn.execute(query)
            ]

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


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat() + "Z"


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
    return TaskView(row.kind, row.sink or None, str(row.status), attempts, row.last_error, run_after, done_at, problem)


def _dead_letter(r: Any) -> DeadLetter:
    attempts, dead_at = int_or_none(tasks.c.attempts, r.attempts), time_or_none(tasks.c.done_at, r.done_at)
    return DeadLetter(r.kind, r.job_id, r.sink or None, attempts, r.last_error, dead_at)
