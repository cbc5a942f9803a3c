"""Recording a callback: the request, its jobs and, for each forwarded one, its version and verify
task, in one transaction. A job already known is a duplicate unless the callback says something new
about it that verification has yet to hear (see :meth:`SqliteRecording._reopen`).

One implementation per database, and both store the same rows (``tests/test_recording.py`` compares
them): on SQLite, SQLAlchemy Core statements inside the write lock (here); on PostgreSQL, one
statement that is a transaction of its own when every job is new (:mod:`webhook.ledger.recording_pg`).
What they share is built here first, before any transaction begins: on SQLite the transaction holds
the write lock, which every writer waits for.

Jobs are written in job id order, so two callbacks naming the same jobs in another order lock them
in the same order and cannot deadlock.

A job has at most ``max_versions`` versions to verify: anyone holding a callback token could add one
with every request, each verified on every pass. A new version past that is kept (its callback is
stored like any other) as :attr:`~webhook.models.VersionStatus.CAPPED`, never verified, and the job is
a duplicate for that callback.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection, Engine

from webhook.ledger.errors import begin
from webhook.ledger.scheduling import reverify, schedule, task_row, unverified
from webhook.ledger.schema import callbacks, jobs, tasks, versions
from webhook.models import Callback, JobStatus, TaskKind, Triaged, VersionStatus, job_to_json

MAX_VERSIONS_PER_JOB = 16  # the default of WEBHOOK_MAX_VERSIONS_PER_JOB


@dataclass(frozen=True)
class RawRequest:
    """The callback request exactly as it arrived."""

    body: bytes
    content_type: str
    headers: dict[str, str]
    remote_addr: str


@dataclass(frozen=True)
class Recorded:
    """What recording a callback stored: the new jobs (and known ones verified again), the duplicates,
    which of the new ones are only recorded, and the jobs whose new version was kept but will not be
    verified (the job has its most versions), each in the callback's order."""

    callback_id: int
    job_ids: tuple[str, ...]
    duplicates: tuple[str, ...]
    ignored: tuple[str, ...]
    capped: tuple[str, ...] = ()


@dataclass(frozen=True)
class Prepared:
    """A callback as the rows it becomes, built before any transaction begins."""

    request: dict[str, Any]  # the row in ``callbacks``; its body is not stored twice (see :class:`SqliteRecording`)
    rows: list[dict[str, Any]]  # each distinct job as its row in ``jobs`` with its version's digest, by job id
    order: tuple[str, ...]  # the job ids in the callback's order, each once
    ignored: frozenset[str]  # the job ids that are only recorded
    max_versions: int  # a job's versions to verify, at most

    @property
    def now(self) -> datetime:
        received_at: datetime = self.request["received_at"]
        return received_at

    @property
    def capped_reason(self) -> str:
        return f"not verified: the job already has {self.max_versions} versions, the most one job may have"

    def answer(self, callback_id: int, inserted: set[str], reopened: set[str], capped: set[str]) -> Recorded:
        """What was stored, given the ids of the jobs inserted, of the known ones verified again, and
        of those whose new version was capped."""
        new = [job_id for job_id in self.order if job_id in inserted or job_id in reopened]
        duplicates = [job_id for job_id in self.order if job_id not in new]
        ignored = [job_id for job_id in new if job_id in self.ignored]
        over = [job_id for job_id in self.order if job_id in capped]
        return Recorded(int(callback_id), tuple(new), tuple(duplicates), tuple(ignored), tuple(over))


class Recording(Protocol):
    """One database's way of storing a prepared callback, in one transaction."""

    def store(self, prepared: Prepared) -> Recorded: ...

    def store_new(self, prepared: Prepared) -> Recorded | None:
        """Store it only if the ledger knows none of its jobs, decided in the same transaction;
        else store nothing at all (None)."""


def prepare(
    raw: RawRequest, callback: Callback, triaged: Sequence[Triaged], now: datetime, max_versions: int
) -> Prepared:
    entries = dict(sorted({entry.job.job_id: entry for entry in reversed(triaged)}.items()))  # first of a twin
    event_name = callback.event_name[:64]
    request = {
        "received_at": now, "remote_addr": raw.remote_addr[:64], "content_type": raw.content_type[:256],
        "headers": json.dumps(raw.headers, sort_keys=True), "raw_body": raw.body, "size": len(raw.body),
        "body_sha256": hashlib.sha256(raw.body).hexdigest(), "body_format": callback.body_format,
        "event_name": event_name,
    }  # fmt: skip
    return Prepared(
        request=request,
        rows=[_row(entry, event_name) for entry in entries.values()],
        order=tuple(dict.fromkeys(entry.job.job_id for entry in triaged)),
        ignored=frozenset(job_id for job_id, entry in entries.items() if not entry.forward),
        max_versions=max_versions,
    )


class SqliteRecording:
    """SQLite: SQLAlchemy Core statements, built once, in a transaction that holds the write lock."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        # A repeated callback (CI retrying, a replay) keeps its metadata, not the body twice.
        found = sa.select(callbacks.c.id).where(callbacks.c.sha256 == sa.bindparam("body_sha256"))
        holder = found.where(callbacks.c.body_of.is_(None)).limit(1).scalar_subquery()
        body = sa.case((holder.is_(None), sa.bindparam("raw_body", type_=sa.LargeBinary)), else_=sa.literal(b""))
        row = {"sha256": sa.bindparam("body_sha256"), "body": body, "body_of": holder}
        self._insert_callback = callbacks.insert().values(row).returning(callbacks.c.id)
        self._insert_jobs = sqlite.insert(jobs).on_conflict_do_nothing().returning(jobs.c.job_id)
        self._insert_versions, self._insert_tasks = versions.insert(), tasks.insert()
        # Keeps what this callback says about a known job; no row if an earlier callback said the same.
        self._add_version = sqlite.insert(versions).on_conflict_do_nothing().returning(versions.c.id)
        ids: sa.BindParameter[str] = sa.bindparam("ids", expanding=True)
        self._any_known = sa.select(jobs.c.job_id).where(jobs.c.job_id.in_(ids)).limit(1)
        self._counted = sa.select(sa.func.count()).where(
            versions.c.job_id == sa.bindparam("job_id"), versions.c.status != VersionStatus.CAPPED
        )

    def store(self, prepared: Prepared) -> Recorded:
        with begin(self._engine) as conn:
            return self._store(conn, prepared)

    def store_new(self, prepared: Prepared) -> Recorded | None:
        with begin(self._engine) as conn:
            # The transaction holds the write lock from its start (BEGIN IMMEDIATE): no other
            # recording can add one of these jobs between this look and the inserts.
            if conn.execute(self._any_known, {"ids": [row["job_id"] for row in prepared.rows]}).first():
                return None
            return self._store(conn, prepared)

    def _store(self, conn: Connection, prepared: Prepared) -> Recorded:
        now, rows = prepared.now, prepared.rows
        forwarded = [row for row in rows if row["status"] == JobStatus.RECEIVED]
        callback_id = conn.execute(self._insert_callback, prepared.request).scalar_one()
        written = [row | {"callback_id": callback_id, "created_at": now, "updated_at": now} for row in rows]
        inserted = set(conn.execute(self._insert_jobs, written).scalars()) if rows else set()
        if fresh := [row for row in forwarded if row["job_id"] in inserted]:
            conn.execute(self._insert_versions, [_version(row, callback_id, now) for row in fresh])
            conn.execute(self._insert_tasks, [task_row(r["job_id"], TaskKind.VERIFY, None, now) for r in fresh])
        reopened: set[str] = set()
        capped: set[str] = set()
        for row in forwarded:
            if row["job_id"] not in inserted:
                self._reopen(conn, row, callback_id, prepared, reopened, capped)
        return prepared.answer(callback_id, inserted, reopened, capped)

    def _reopen(
        self,
        conn: Connection,
        row: dict[str, Any],
        callback_id: int,
        prepared: Prepared,
        reopened: set[str],
        capped: set[str],
    ) -> None:
        """Whether a callback for a known job gets it verified (again), added to ``reopened``: a different
        version of a job that is not verified yet (unless the job has its most versions: ``capped``), or
        any callback for a job whose verification died. Other jobs keep what they have."""
        job_id, now = row["job_id"], prepared.now
        status = conn.execute(sa.select(jobs.c.status).where(jobs.c.job_id == job_id)).scalar_one()
        dead_unverified = status == JobStatus.DEAD and unverified(conn, job_id, status)
        if not dead_unverified and status not in (JobStatus.RECEIVED, JobStatus.REJECTED):
            return
        version = _version(row, callback_id, now)
        if conn.execute(self._counted, {"job_id": job_id}).scalar_one() >= prepared.max_versions:
            version |= {"status": VersionStatus.CAPPED, "reason": prepared.capped_reason}
        added = conn.execute(self._add_version, version).first() is not None
        if added and version["status"] == VersionStatus.CAPPED:
            capped.add(job_id)
        if not dead_unverified and (not added or job_id in capped):
            return  # nothing new to verify: a worker verifying the job keeps its lease
        if status == JobStatus.RECEIVED:
            # A worker verifying the earlier versions loses its lease: the new run sees every version.
            schedule(conn, job_id, TaskKind.VERIFY, None, now)
        else:
            reverify(conn, job_id, now)
        reopened.add(job_id)


def _row(entry: Triaged, event_name: str) -> dict[str, Any]:
    """The job as a row in ``jobs``, with its version's digest."""
    detail = job_to_json(entry.job)
    return {"job_id": entry.job.job_id, "event_name": event_name, "tag": entry.job.tag[:64], "state": entry.job.state,
            "reason": entry.reason, "status": JobStatus.RECEIVED if entry.forward else JobStatus.IGNORED,
            "detail": detail, "digest": hashlib.sha256(detail.encode()).hexdigest()}  # fmt: skip


def _version(job: dict[str, Any], callback_id: int, now: datetime) -> dict[str, Any]:
    """What a callback says about a job (``job``: its :func:`_row`), as a row in ``job_versions``."""
    return job | {"callback_id": callback_id, "status": VersionStatus.PENDING, "reason": "", "received_at": now}
