"""The ledger: every callback, job and unit of work, in SQLite or PostgreSQL.

One SQLAlchemy Core schema serves both. Work is claimed with a lease, so a crashed
worker's task becomes due again when its lease runs out; on PostgreSQL claims use
``FOR UPDATE SKIP LOCKED``, on SQLite every write transaction is ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from webhook.models import (
    Callback,
    Job,
    JobStatus,
    TaskKind,
    TaskStatus,
    job_from_dict,
    job_to_dict,
)

metadata = sa.MetaData()

callbacks = sa.Table(
    "callbacks",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("received_at", sa.DateTime, nullable=False),
    sa.Column("remote_addr", sa.String(64), nullable=False),
    sa.Column("content_type", sa.String(256), nullable=False),
    sa.Column("headers", sa.Text, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("body_format", sa.String(8), nullable=False),
    sa.Column("event_name", sa.String(64), nullable=False),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("job_id", sa.String(128), primary_key=True),
    sa.Column("callback_id", sa.Integer, sa.ForeignKey("callbacks.id"), nullable=False),
    sa.Column("event_name", sa.String(64), nullable=False),
    sa.Column("tag", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
)

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(128), sa.ForeignKey("jobs.job_id"), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("sink", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("run_after", sa.DateTime, nullable=False),
    sa.Column("locked_until", sa.DateTime, nullable=True),
    sa.Column("locked_by", sa.String(128), nullable=True),
    sa.Column("last_error", sa.Text, nullable=False, default=""),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.Column("done_at", sa.DateTime, nullable=True),
    sa.UniqueConstraint("job_id", "kind", "sink"),
    sa.Index("ix_tasks_due", "status", "run_after"),
)

VERIFY_SINK = ""  # a verify task belongs to the job, not to a sink


def utcnow() -> datetime:
    """Naive UTC: one representation that both SQLite and PostgreSQL compare correctly."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class RawRequest:
    """The callback request exactly as it arrived."""

    body: bytes
    content_type: str
    headers: dict[str, str]
    remote_addr: str


@dataclass(frozen=True)
class Recorded:
    """What :meth:`Ledger.record_callback` stored."""

    callback_id: int
    job_ids: tuple[str, ...]
    duplicates: tuple[str, ...]
    ignored: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    id: int
    job_id: str
    kind: TaskKind
    sink: str
    attempts: int


@dataclass(frozen=True)
class Claim:
    """Tasks leased to one worker: one verify task, or a job's due deliveries."""

    job: Job
    status: JobStatus
    kind: TaskKind
    tasks: tuple[Task, ...]
    received_at: datetime  # when the callback was recorded (naive UTC)
    delivered_to: frozenset[str] = frozenset()  # sinks that already have this job


@dataclass(frozen=True)
class DeadDelivery:
    job_id: str
    sink: str
    attempts: int
    last_error: str
    dead_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "sink": self.sink,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "dead_at": self.dead_at.isoformat() + "Z",
        }


@dataclass(frozen=True)
class TaskView:
    kind: str
    sink: str
    status: str
    attempts: int
    last_error: str
    run_after: datetime
    done_at: datetime | None


@dataclass(frozen=True)
class JobView:
    job_id: str
    tag: str
    event_name: str
    state: str
    status: str
    reason: str
    created_at: datetime
    updated_at: datetime
    job: Job
    tasks: tuple[TaskView, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "tag": self.tag,
            "event_name": self.event_name,
            "state": self.state,
            "status": self.status,
            "reason": self.reason,
            "created_at": self.created_at.isoformat() + "Z",
            "updated_at": self.updated_at.isoformat() + "Z",
            "verify": [_task_dict(t) for t in self.tasks if t.kind == TaskKind.VERIFY],
            "deliveries": [_task_dict(t) for t in self.tasks if t.kind == TaskKind.DELIVER],
            "detail": job_to_dict(self.job),
        }


def _task_dict(task: TaskView) -> dict[str, Any]:
    out: dict[str, Any] = {
        "status": task.status,
        "attempts": task.attempts,
        "last_error": task.last_error,
        "next_attempt_at": task.run_after.isoformat() + "Z" if task.status == TaskStatus.PENDING else None,
        "done_at": task.done_at.isoformat() + "Z" if task.done_at else None,
    }
    if task.kind == TaskKind.DELIVER:
        out = {"sink": task.sink, **out}
    return out


class LedgerError(Exception):
    """A ledger operation that cannot be carried out as asked (unknown job, bad replay)."""


class Ledger:
    """All reads and writes of the service's durable state."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _make_engine(url)
        self.is_postgres = self.engine.dialect.name == "postgresql"

    def create_schema(self) -> None:
        """Create missing tables; safe when several processes start at once."""
        with self.transaction() as conn:
            if self.is_postgres:
                # Concurrent CREATE TABLE races on PostgreSQL's catalog; serialize start-ups.
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7305513)"))
            metadata.create_all(conn)

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    # -- receive ---------------------------------------------------------------------------

    def record_callback(self, raw: RawRequest, callback: Callback, allowed_tags: frozenset[str]) -> Recorded:
        """Store the request, its jobs and their first task in one transaction."""
        now = utcnow()
        new: list[str] = []
        duplicates: list[str] = []
        ignored: list[str] = []
        with self.transaction() as conn:
            callback_id = conn.execute(
                callbacks.insert()
                .values(
                    received_at=now,
                    remote_addr=raw.remote_addr[:64],
                    content_type=raw.content_type[:256],
                    headers=json.dumps(raw.headers, sort_keys=True),
                    body=raw.body,
                    body_format=callback.body_format,
                    event_name=callback.event_name[:64],
                )
                .returning(callbacks.c.id)
            ).scalar_one()
            for job in callback.jobs:
                forward = callback.event_name == "TaskFinish" and job.tag in allowed_tags
                status = JobStatus.RECEIVED if forward else JobStatus.IGNORED
                reason = "" if forward else _ignore_reason(callback.event_name, job.tag)
                inserted = conn.execute(
                    self._insert_ignore(jobs)
                    .values(
                        job_id=job.job_id,
                        callback_id=callback_id,
                        event_name=callback.event_name[:64],
                        tag=job.tag[:64],
                        state=job.state,
                        status=status,
                        reason=reason,
                        detail=json.dumps(job_to_dict(job)),
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(jobs.c.job_id)
                ).first()
                if inserted is None:
                    if forward and _reopen_rejected(conn, job, callback_id, now):
                        new.append(job.job_id)
                    else:
                        duplicates.append(job.job_id)
                    continue
                new.append(job.job_id)
                if forward:
                    _insert_task(conn, job.job_id, TaskKind.VERIFY, VERIFY_SINK, now)
                else:
                    ignored.append(job.job_id)
        return Recorded(int(callback_id), tuple(new), tuple(duplicates), tuple(ignored))

    def _insert_ignore(self, table: sa.Table) -> Any:
        dialect = postgresql if self.is_postgres else sqlite
        return dialect.insert(table).on_conflict_do_nothing()

    # -- worker ----------------------------------------------------------------------------

    def claim(self, worker_id: str, lease_seconds: float) -> Claim | None:
        """Lease the next due work: a verify task, or every due delivery of one job."""
        now = utcnow()
        due = sa.and_(
            tasks.c.status == TaskStatus.PENDING,
            tasks.c.run_after <= now,
            sa.or_(tasks.c.locked_until.is_(None), tasks.c.locked_until < now),
        )
        with self.transaction() as conn:
            first = conn.execute(
                sa.select(tasks.c.id, tasks.c.job_id, tasks.c.kind)
                .where(due)
                .order_by(tasks.c.run_after, tasks.c.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if first is None:
                return None
            ids = [first.id]
            if first.kind == TaskKind.DELIVER:
                # One fetch serves every sink of the job that is due now.
                ids = list(
                    conn.execute(
                        sa.select(tasks.c.id)
                        .where(due, tasks.c.job_id == first.job_id, tasks.c.kind == TaskKind.DELIVER)
                        .with_for_update(skip_locked=True)
                    ).scalars()
                )
            conn.execute(
                tasks.update()
                .where(tasks.c.id.in_(ids))
                .values(
                    locked_by=worker_id,
                    locked_until=now + timedelta(seconds=lease_seconds),
                    attempts=tasks.c.attempts + 1,
                    updated_at=now,
                )
            )
            rows = conn.execute(sa.select(tasks).where(tasks.c.id.in_(ids)).order_by(tasks.c.sink)).all()
            job = conn.execute(
                sa.select(jobs.c.detail, jobs.c.status, jobs.c.created_at).where(jobs.c.job_id == first.job_id)
            ).one()
            delivered_to = conn.execute(
                sa.select(tasks.c.sink).where(
                    tasks.c.job_id == first.job_id,
                    tasks.c.kind == TaskKind.DELIVER,
                    tasks.c.status == TaskStatus.DONE,
                )
            ).scalars()
            return Claim(
                job=job_from_dict(json.loads(job.detail)),
                status=JobStatus(job.status),
                kind=TaskKind(first.kind),
                tasks=tuple(Task(r.id, r.job_id, TaskKind(r.kind), r.sink, r.attempts) for r in rows),
                received_at=job.created_at,
                delivered_to=frozenset(delivered_to),
            )

    def extend_lease(self, task_ids: Sequence[int], worker_id: str, lease_seconds: float) -> int:
        """Keep a long step's lease alive; returns how many tasks are still ours."""
        now = utcnow()
        with self.transaction() as conn:
            return conn.execute(
                tasks.update()
                .where(tasks.c.id.in_(task_ids), tasks.c.locked_by == worker_id)
                .values(locked_until=now + timedelta(seconds=lease_seconds))
            ).rowcount

    def accept(self, task: Task, worker_id: str, sinks: Sequence[str]) -> bool:
        """Verification passed: the job is verified and one delivery per sink is due."""
        now = utcnow()
        with self.transaction() as conn:
            if not _finish_task(conn, task, worker_id, TaskStatus.DONE, "", now):
                return False
            _set_job(conn, task.job_id, JobStatus.VERIFIED, "", now)
            for sink in sinks:
                _insert_task(conn, task.job_id, TaskKind.DELIVER, sink, now)
            if not sinks:
                _set_job(conn, task.job_id, JobStatus.DELIVERED, "no sink takes this event", now)
        return True

    def reject(self, task: Task, worker_id: str, reason: str) -> bool:
        """Verification refused the job: it is never fetched nor forwarded."""
        now = utcnow()
        with self.transaction() as conn:
            if not _finish_task(conn, task, worker_id, TaskStatus.DONE, reason, now):
                return False
            _set_job(conn, task.job_id, JobStatus.REJECTED, reason, now)
        return True

    def delivered(self, task: Task, worker_id: str) -> bool:
        now = utcnow()
        with self.transaction() as conn:
            if not _finish_task(conn, task, worker_id, TaskStatus.DONE, "", now):
                return False
            _settle_job(conn, task.job_id, now)
        return True

    def retry_later(self, task: Task, worker_id: str, error: str, delay: float) -> bool:
        """The step failed but may succeed later: due again after ``delay`` seconds."""
        now = utcnow()
        with self.transaction() as conn:
            return (
                conn.execute(
                    tasks.update()
                    .where(tasks.c.id == task.id, tasks.c.locked_by == worker_id)
                    .values(
                        last_error=error,
                        run_after=now + timedelta(seconds=delay),
                        locked_by=None,
                        locked_until=None,
                        updated_at=now,
                    )
                ).rowcount
                == 1
            )

    def give_up(self, task: Task, worker_id: str, error: str) -> bool:
        """The step ran out of attempts: the task is dead, and so is the job."""
        now = utcnow()
        with self.transaction() as conn:
            if not _finish_task(conn, task, worker_id, TaskStatus.DEAD, error, now):
                return False
            if task.kind == TaskKind.VERIFY:
                _set_job(conn, task.job_id, JobStatus.DEAD, f"verification gave up: {error}", now)
            else:
                _settle_job(conn, task.job_id, now)
        return True

    # -- operate ---------------------------------------------------------------------------

    def list_jobs(self, limit: int = 50, status: str | None = None) -> list[JobView]:
        query = sa.select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.job_id).limit(limit)
        if status:
            query = query.where(jobs.c.status == status)
        with self.engine.connect() as conn:
            return [_job_view(row, ()) for row in conn.execute(query)]

    def show_job(self, job_id: str) -> JobView:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.job_id == job_id)).first()
            if row is None:
                raise LedgerError(f"no job {job_id!r} in the ledger")
            task_rows = conn.execute(
                sa.select(tasks).where(tasks.c.job_id == job_id).order_by(tasks.c.kind.desc(), tasks.c.sink)
            ).all()
        views = tuple(
            TaskView(t.kind, t.sink, t.status, t.attempts, t.last_error, t.run_after, t.done_at) for t in task_rows
        )
        return _job_view(row, views)

    def replay(self, job_id: str, sinks: Sequence[str]) -> list[str]:
        """Deliver a verified job again to ``sinks``; returns the sinks scheduled."""
        now = utcnow()
        with self.transaction() as conn:
            row = conn.execute(sa.select(jobs.c.status, jobs.c.reason).where(jobs.c.job_id == job_id)).first()
            if row is None:
                raise LedgerError(f"no job {job_id!r} in the ledger")
            if row.status not in (JobStatus.VERIFIED, JobStatus.DELIVERED, JobStatus.DEAD):
                raise LedgerError(f"job {job_id} is {row.status}; only verified jobs can be replayed")
            if row.status == JobStatus.DEAD and not _has_verified(conn, job_id):
                raise LedgerError(f"job {job_id} was never verified ({row.reason}); nothing to replay")
            for sink in sinks:
                updated = conn.execute(
                    tasks.update()
                    .where(tasks.c.job_id == job_id, tasks.c.kind == TaskKind.DELIVER, tasks.c.sink == sink)
                    .values(
                        status=TaskStatus.PENDING,
                        attempts=0,
                        run_after=now,
                        locked_by=None,
                        locked_until=None,
                        done_at=None,
                        updated_at=now,
                    )
                ).rowcount
                if not updated:
                    _insert_task(conn, job_id, TaskKind.DELIVER, sink, now)
            _set_job(conn, job_id, JobStatus.VERIFIED, "", now)
        return list(sinks)

    def dead_deliveries(self, sink: str | None = None, since: datetime | None = None) -> list[DeadDelivery]:
        """Deliveries that ran out of attempts (the dead letters), oldest first."""
        query = (
            sa.select(tasks)
            .where(tasks.c.kind == TaskKind.DELIVER, tasks.c.status == TaskStatus.DEAD)
            .order_by(tasks.c.done_at, tasks.c.id)
        )
        if sink is not None:
            query = query.where(tasks.c.sink == sink)
        if since is not None:
            query = query.where(tasks.c.done_at >= since)
        with self.engine.connect() as conn:
            return [DeadDelivery(r.job_id, r.sink, r.attempts, r.last_error, r.done_at) for r in conn.execute(query)]

    def counts(self) -> dict[str, int]:
        """Jobs per status and due tasks, for health and metrics."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)).all()
            pending = conn.execute(
                sa.select(sa.func.count()).select_from(tasks).where(tasks.c.status == TaskStatus.PENDING)
            ).scalar_one()
        out = {f"jobs_{status}": int(n) for status, n in rows}
        out["tasks_pending"] = int(pending)
        return out


def _make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        # Bounded waits: a database that stalls (network partition, overloaded server) must turn
        # into an error the caller answers (503, retry later), not a thread hung forever.
        engine = sa.create_engine(
            url,
            pool_pre_ping=True,
            pool_timeout=10,
            connect_args={"connect_timeout": 5, "tcp_user_timeout": 30_000, "keepalives_idle": 30},
        )

        @sa.event.listens_for(engine, "connect")
        def _on_pg_connect(dbapi_conn: Any, _record: Any) -> None:
            with dbapi_conn.cursor() as cursor:
                cursor.execute("SET statement_timeout = '30s'")
            dbapi_conn.commit()

        return engine
    path = url.split(":///", 1)[1] if ":///" in url else ""
    file_backed = bool(path) and path != ":memory:"
    if file_backed:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin (see below).
        dbapi_conn.isolation_level = None
        dbapi_conn.execute("PRAGMA busy_timeout=30000")
        dbapi_conn.execute("PRAGMA foreign_keys=ON")
        if file_backed:
            _use_wal(dbapi_conn)

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Take the write lock up front: two workers can then never claim the same task.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _use_wal(dbapi_conn: Any) -> None:
    """WAL lets readers run beside the writer. Switching needs an exclusive lock and does not
    wait on the busy handler, so processes opening a new database together retry here."""
    for _ in range(200):
        try:
            if dbapi_conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal":
                return
        except sqlite3.OperationalError:
            pass
        time.sleep(0.05)
    raise sqlite3.OperationalError("could not switch the SQLite ledger to WAL mode")


def _reopen_rejected(conn: Connection, job: Job, callback_id: int, now: datetime) -> bool:
    """A different claim about a job that verification rejected gets verified in its turn.

    Otherwise a forged callback that arrives first would make the genuine one a duplicate,
    and a real job would never be delivered.
    """
    detail = json.dumps(job_to_dict(job))
    reopened = conn.execute(
        jobs.update()
        .where(jobs.c.job_id == job.job_id, jobs.c.status == JobStatus.REJECTED, jobs.c.detail != detail)
        .values(
            callback_id=callback_id,
            state=job.state,
            status=JobStatus.RECEIVED,
            reason="",
            detail=detail,
            updated_at=now,
        )
    ).rowcount
    if reopened:
        conn.execute(
            tasks.update()
            .where(tasks.c.job_id == job.job_id, tasks.c.kind == TaskKind.VERIFY)
            .values(status=TaskStatus.PENDING, attempts=0, run_after=now, last_error="", done_at=None, updated_at=now)
        )
    return bool(reopened)


def _insert_task(conn: Connection, job_id: str, kind: TaskKind, sink: str, now: datetime) -> None:
    conn.execute(
        tasks.insert().values(
            job_id=job_id,
            kind=kind,
            sink=sink,
            status=TaskStatus.PENDING,
            attempts=0,
            run_after=now,
            last_error="",
            updated_at=now,
        )
    )


def _finish_task(conn: Connection, task: Task, worker_id: str, status: TaskStatus, error: str, now: datetime) -> bool:
    """Close a task only if this worker still holds its lease."""
    return (
        conn.execute(
            tasks.update()
            .where(tasks.c.id == task.id, tasks.c.locked_by == worker_id, tasks.c.status == TaskStatus.PENDING)
            .values(status=status, last_error=error, locked_by=None, locked_until=None, done_at=now, updated_at=now)
        ).rowcount
        == 1
    )


def _set_job(conn: Connection, job_id: str, status: JobStatus, reason: str, now: datetime) -> None:
    conn.execute(jobs.update().where(jobs.c.job_id == job_id).values(status=status, reason=reason, updated_at=now))


def _settle_job(conn: Connection, job_id: str, now: datetime) -> None:
    """Derive the job's status from its deliveries once none is pending."""
    # Two workers may each finish one of the job's deliveries at the same moment. Under READ
    # COMMITTED neither would see the other's "done" and the job would stay verified forever;
    # locking the job row makes the second wait for the first commit, then see it.
    conn.execute(sa.select(jobs.c.job_id).where(jobs.c.job_id == job_id).with_for_update())
    statuses = set(
        conn.execute(
            sa.select(tasks.c.status).where(tasks.c.job_id == job_id, tasks.c.kind == TaskKind.DELIVER)
        ).scalars()
    )
    if TaskStatus.PENDING in statuses:
        return
    if TaskStatus.DEAD in statuses:
        _set_job(conn, job_id, JobStatus.DEAD, "a delivery ran out of attempts", now)
    else:
        _set_job(conn, job_id, JobStatus.DELIVERED, "", now)


def _has_verified(conn: Connection, job_id: str) -> bool:
    return (
        conn.execute(
            sa.select(tasks.c.id).where(tasks.c.job_id == job_id, tasks.c.kind == TaskKind.DELIVER).limit(1)
        ).first()
        is not None
    )


def _ignore_reason(event_name: str, tag: str) -> str:
    if event_name != "TaskFinish":
        return f"event {event_name} is recorded, not forwarded"
    return f"tag {tag} is not in WEBHOOK_ALLOWED_TAGS"


def _job_view(row: Any, task_views: tuple[TaskView, ...]) -> JobView:
    return JobView(
        job_id=row.job_id,
        tag=row.tag,
        event_name=row.event_name,
        state=row.state,
        status=row.status,
        reason=row.reason,
        created_at=row.created_at,
        updated_at=row.updated_at,
        job=job_from_dict(json.loads(row.detail)),
        tasks=task_views,
    )
