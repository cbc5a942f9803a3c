"""Jobs as a whole: recorded from callbacks (each distinct one a version), verified again, replayed.

The functions taking a :class:`~sqlalchemy.engine.Connection` run inside the caller's
transaction; :mod:`webhook.ledger.queue` uses them when a task's outcome changes its job.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from webhook.ledger.schema import JOB_WIDE, LedgerError, callbacks, jobs, tasks, utcnow, versions
from webhook.models import Callback, JobStatus, TaskKind, TaskStatus, VersionStatus, job_to_dict
from webhook.triage import Triaged


@dataclass(frozen=True)
class RawRequest:
    """The callback request exactly as it arrived."""

    body: bytes
    content_type: str
    headers: dict[str, str]
    remote_addr: str


@dataclass(frozen=True)
class Replayed:
    """What a replay scheduled: the job's verification again, or deliveries to ``sinks``."""

    job_id: str
    verify: bool
    sinks: tuple[str, ...]


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
        """Store the request, its jobs and, for each forwarded one, its version and verify task, in one transaction.

        Jobs are written in job id order, so two callbacks naming the same jobs in another order
        lock them in the same order and cannot deadlock.
        """
        now = utcnow()
        new: list[str] = []
        duplicates: list[str] = []
        ignored: list[str] = []
        digest = hashlib.sha256(raw.body).hexdigest()
        with self._engine.begin() as conn:
            # A repeated callback (CI retrying, a replayed request) keeps its metadata, not the body
            # twice. Looked up inside the insert: no round trip of its own on the ingest path.
            holder = (
                sa.select(callbacks.c.id)
                .where(callbacks.c.sha256 == digest, callbacks.c.body_of.is_(None))
                .limit(1)
                .scalar_subquery()
            )
            callback_id = conn.execute(
                callbacks.insert()
                .values(
                    received_at=now,
                    remote_addr=raw.remote_addr[:64],
                    content_type=raw.content_type[:256],
                    headers=json.dumps(raw.headers, sort_keys=True),
                    body=sa.case(
                        (holder.is_(None), sa.literal(raw.body, sa.LargeBinary)), else_=sa.literal(b"", sa.LargeBinary)
                    ),
                    body_format=callback.body_format,
                    event_name=callback.event_name[:64],
                    sha256=digest,
                    size=len(raw.body),
                    body_of=holder,
                )
                .returning(callbacks.c.id)
            ).scalar_one()
            for entry in sorted(triaged, key=lambda e: e.job.job_id):
                job = entry.job
                detail = json.dumps(job_to_dict(job))
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
                        detail=detail,
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(jobs.c.job_id)
                ).first()
                if not entry.forward:
                    if inserted is None:
                        duplicates.append(job.job_id)
                    else:
                        new.append(job.job_id)
                        ignored.append(job.job_id)
                    continue
                if inserted is not None:
                    self._add_version(conn, job.job_id, callback_id, detail, now)
                    schedule(conn, job.job_id, TaskKind.VERIFY, None, now)
                    new.append(job.job_id)
                elif self._reopen(conn, job.job_id, callback_id, detail, now):
                    new.append(job.job_id)
                else:
                    duplicates.append(job.job_id)
        # Answered in the callback's own order, whatever order the rows were written in.
        position = {entry.job.job_id: n for n, entry in reversed(list(enumerate(triaged)))}
        new, duplicates, ignored = (sorted(ids, key=position.__getitem__) for ids in (new, duplicates, ignored))
        return Recorded(int(callback_id), tuple(new), tuple(duplicates), tuple(ignored))

    def replay(self, job_id: str, sinks: Sequence[str]) -> Replayed:
        """Verify the job again if it was rejected or its verification died; else deliver it again to ``sinks``."""
        now = utcnow()
        with self._engine.begin() as conn:
            row = conn.execute(sa.select(jobs.c.status).where(jobs.c.job_id == job_id).with_for_update()).first()
            if row is None:
                raise LedgerError(f"no job {job_id!r} in the ledger")
            if _unverified(conn, job_id, row.status):
                reverify(conn, job_id, now)
                return Replayed(job_id, verify=True, sinks=())
            if row.status not in (JobStatus.VERIFIED, JobStatus.DELIVERED, JobStatus.DEAD):
                raise LedgerError(f"job {job_id} is {row.status}: it is waiting for verification, nothing to replay")
            for sink in sinks:
                schedule(conn, job_id, TaskKind.DELIVER, sink, now)
            set_status(conn, job_id, JobStatus.VERIFIED, "", now)
        return Replayed(job_id, verify=False, sinks=tuple(sinks))

    def _reopen(self, conn: Connection, job_id: str, callback_id: int, detail: str, now: datetime) -> bool:
        """Whether a callback for a known job gets it verified (again): a different version of a job that is
        not verified yet, or any callback for a job whose verification died. Other jobs keep what they have."""
        status = conn.execute(sa.select(jobs.c.status).where(jobs.c.job_id == job_id).with_for_update()).scalar_one()
        dead_unverified = status == JobStatus.DEAD and _unverified(conn, job_id, status)
        if not dead_unverified and status not in (JobStatus.RECEIVED, JobStatus.REJECTED):
            return False
        if not self._add_version(conn, job_id, callback_id, detail, now) and not dead_unverified:
            return False
        if status == JobStatus.RECEIVED:
            # A worker verifying the earlier versions loses its lease: the new run sees every version.
            schedule(conn, job_id, TaskKind.VERIFY, None, now)
        else:
            reverify(conn, job_id, now)
        return True

    def _add_version(self, conn: Connection, job_id: str, callback_id: int, detail: str, now: datetime) -> bool:
        """Keep what this callback says about the job; False if an earlier callback said the same."""
        added = conn.execute(
            self._dialect.insert(versions)
            .on_conflict_do_nothing()
            .values(
                job_id=job_id,
                callback_id=callback_id,
                digest=hashlib.sha256(detail.encode()).hexdigest(),
                detail=detail,
                status=VersionStatus.PENDING,
                reason="",
                received_at=now,
            )
            .returning(versions.c.id)
        ).first()
        return added is not None


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


def reverify(conn: Connection, job_id: str, now: datetime) -> None:
    """Verify every version of the job again from scratch: CI's answer or the allowlist may have changed."""
    conn.execute(versions.update().where(versions.c.job_id == job_id).values(status=VersionStatus.PENDING, reason=""))
    schedule(conn, job_id, TaskKind.VERIFY, None, now)
    set_status(conn, job_id, JobStatus.RECEIVED, "", now)


def _unverified(conn: Connection, job_id: str, status: str) -> bool:
    """Rejected, or dead before any delivery was scheduled (its verification gave up)."""
    if status == JobStatus.REJECTED:
        return True
    if status != JobStatus.DEAD:
        return False
    found = conn.execute(
        sa.select(tasks.c.id).where(tasks.c.job_id == job_id, tasks.c.kind == TaskKind.DELIVER).limit(1)
    ).first()
    return found is None
