"""Jobs and what happens to them as a whole: recorded from a callback, settled, replayed.

The functions taking a :class:`~sqlalchemy.engine.Connection` run inside the caller's
transaction; :mod:`webhook.ledger.queue` uses them when a task's outcome changes its job.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from webhook.ledger.schema import JOB_WIDE, LedgerError, callbacks, jobs, tasks, utcnow
from webhook.models import Callback, Job, JobStatus, TaskKind, TaskStatus, job_to_dict
from webhook.triage import Triaged


@dataclass(frozen=True)
class RawRequest:
    """The callback request exactly as it arrived."""

    body: bytes
    content_type: str
    headers: dict[str, str]
    remote_addr: str


@dataclass(frozen=True)
class Recorded:
    """What :meth:`Jobs.record` stored."""

    callback_id: int
    job_ids: tuple[str, ...]
    duplicates: tuple[str, ...]
    ignored: tuple[str, ...]


class Jobs:
    """Writes that concern a job as a whole."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._dialect = postgresql if engine.dialect.name == "postgresql" else sqlite

    def record(self, raw: RawRequest, callback: Callback, triaged: Sequence[Triaged]) -> Recorded:
        """Store the request, its jobs and, for each forwarded one, its verify task, in one transaction."""
        now = utcnow()
        new: list[str] = []
        duplicates: list[str] = []
        ignored: list[str] = []
        with self._engine.begin() as conn:
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
            for entry in triaged:
                job = entry.job
                inserted = conn.execute(
                    self._dialect.insert(jobs)
                    .on_conflict_do_nothing()
                    .values(
                        job_id=job.job_id,
                        callback_id=callback_id,
                        event_name=callback.event_name[:64],
                        tag=job.tag[:64],
                        state=job.state,
                        status=JobStatus.RECEIVED if entry.forward else JobStatus.IGNORED,
                        reason=entry.reason,
                        detail=json.dumps(job_to_dict(job)),
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(jobs.c.job_id)
                ).first()
                if inserted is None:
                    reopened = entry.forward and _reopen_rejected(conn, job, callback_id, now)
                    (new if reopened else duplicates).append(job.job_id)
                    continue
                new.append(job.job_id)
                if entry.forward:
                    schedule(conn, job.job_id, TaskKind.VERIFY, None, now)
                else:
                    ignored.append(job.job_id)
        return Recorded(int(callback_id), tuple(new), tuple(duplicates), tuple(ignored))

    def replay(self, job_id: str, sinks: Sequence[str]) -> list[str]:
        """Deliver a verified job again to ``sinks``; returns the sinks scheduled."""
        now = utcnow()
        with self._engine.begin() as conn:
            row = conn.execute(sa.select(jobs.c.status, jobs.c.reason).where(jobs.c.job_id == job_id)).first()
            if row is None:
                raise LedgerError(f"no job {job_id!r} in the ledger")
            if row.status not in (JobStatus.VERIFIED, JobStatus.DELIVERED, JobStatus.DEAD):
                raise LedgerError(f"job {job_id} is {row.status}; only verified jobs can be replayed")
            if row.status == JobStatus.DEAD and not _has_deliveries(conn, job_id):
                raise LedgerError(f"job {job_id} was never verified ({row.reason}); nothing to replay")
            for sink in sinks:
                schedule(conn, job_id, TaskKind.DELIVER, sink, now)
            set_status(conn, job_id, JobStatus.VERIFIED, "", now)
        return list(sinks)


def schedule(conn: Connection, job_id: str, kind: TaskKind, sink: str | None, now: datetime) -> None:
    """Make the job's task of ``kind`` (for ``sink``) due now with a fresh budget, creating it if needed."""
    sink = JOB_WIDE if sink is None else sink
    reset = conn.execute(
        tasks.update()
        .where(tasks.c.job_id == job_id, tasks.c.kind == kind, tasks.c.sink == sink)
        .values(
            status=TaskStatus.PENDING,
            attempts=0,
            run_after=now,
            locked_by=None,
            locked_until=None,
            last_error="",
            done_at=None,
            updated_at=now,
        )
    ).rowcount
    if not reset:
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


def set_status(conn: Connection, job_id: str, status: JobStatus, reason: str, now: datetime) -> None:
    conn.execute(jobs.update().where(jobs.c.job_id == job_id).values(status=status, reason=reason, updated_at=now))


def settle(conn: Connection, job_id: str, now: datetime) -> None:
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
        set_status(conn, job_id, JobStatus.DEAD, "a delivery ran out of attempts", now)
    else:
        set_status(conn, job_id, JobStatus.DELIVERED, "", now)


def _reopen_rejected(conn: Connection, job: Job, callback_id: int, now: datetime) -> bool:
    """A different claim about a job that verification rejected gets verified in its turn.

    Otherwise a forged callback that arrives first would make the genuine one a duplicate.
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
        schedule(conn, job.job_id, TaskKind.VERIFY, None, now)
    return bool(reopened)


def _has_deliveries(conn: Connection, job_id: str) -> bool:
    found = conn.execute(
        sa.select(tasks.c.id).where(tasks.c.job_id == job_id, tasks.c.kind == TaskKind.DELIVER).limit(1)
    ).first()
    return found is not None
