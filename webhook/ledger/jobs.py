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
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from webhook.intake.triage import Triaged
from webhook.ledger.schema import JOB_WIDE, LedgerError, callbacks, jobs, tasks, utcnow, versions
from webhook.ledger.wakeup import CHANNEL, notify
from webhook.models import Callback, JobStatus, TaskKind, TaskStatus, VersionStatus, job_to_dict


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


# PostgreSQL: a callback whose jobs are all new, recorded in one statement that is a transaction of
# its own (one round trip). It stores nothing when one of the jobs is known (and fails when another
# callback records one meanwhile); Jobs.record then takes the general path. Formatted with constants only.
_RECORD_NEW = f"""
WITH input AS (SELECT * FROM ROWS FROM (json_to_recordset(CAST(%(jobs)s AS json)) AS (job_id text, tag text,
    state text, status text, reason text, detail text, digest text)) WITH ORDINALITY AS i (job_id, tag, state,
    status, reason, detail, digest, n)
), holder AS (SELECT id FROM callbacks WHERE sha256 = %(body_sha256)s AND body_of IS NULL LIMIT 1
), stored AS (
    INSERT INTO callbacks (received_at, remote_addr, content_type, headers, body, body_format, event_name, sha256,
        size, body_of)
    SELECT %(received_at)s, %(remote_addr)s, %(content_type)s, %(headers)s,
        CASE WHEN holder.id IS NULL THEN %(raw_body)s ELSE '' END, %(body_format)s, %(event_name)s, %(body_sha256)s,
        %(size)s, holder.id
    FROM (SELECT) AS one LEFT JOIN holder ON true WHERE NOT EXISTS (SELECT FROM jobs JOIN input USING (job_id))
    RETURNING id, received_at AS at
), new_jobs AS (
    INSERT INTO jobs (job_id, callback_id, event_name, tag, state, status, reason, detail, created_at, updated_at)
    SELECT i.job_id, s.id, %(event_name)s, i.tag, i.state, i.status, i.reason, i.detail, s.at, s.at
    FROM stored AS s, input AS i ORDER BY i.n
), new_versions AS (
    INSERT INTO job_versions (job_id, callback_id, digest, detail, status, reason, received_at)
    SELECT i.job_id, s.id, i.digest, i.detail, '{VersionStatus.PENDING}', '', s.at
    FROM stored AS s, input AS i WHERE i.status = '{JobStatus.RECEIVED}'
), due AS (
    INSERT INTO tasks (job_id, kind, sink, status, attempts, run_after, last_error, updated_at)
    SELECT i.job_id, '{TaskKind.VERIFY}', '{JOB_WIDE}', '{TaskStatus.PENDING}', 0, s.at, '', s.at
    FROM stored AS s, input AS i WHERE i.status = '{JobStatus.RECEIVED}' RETURNING id
)
SELECT (SELECT id FROM stored), (SELECT count(pg_notify('{CHANNEL}', '')) FROM (SELECT FROM due LIMIT 1) AS d)
"""  # noqa: S608


class Jobs:
    """Writes that concern a job as a whole."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
        # Built once. A repeated callback (CI retrying, a replay) keeps its metadata, not the body twice.
        found = sa.select(callbacks.c.id).where(callbacks.c.sha256 == sa.bindparam("body_sha256"))
        holder = found.where(callbacks.c.body_of.is_(None)).limit(1).scalar_subquery()
        body = sa.case((holder.is_(None), sa.bindparam("raw_body", type_=sa.LargeBinary)), else_=sa.literal(b""))
        row = {"sha256": sa.bindparam("body_sha256"), "body": body, "body_of": holder}
        self._insert_callback = callbacks.insert().values(row).returning(callbacks.c.id)
        self._insert_jobs = self._dialect.insert(jobs).on_conflict_do_nothing().returning(jobs.c.job_id)
        self._insert_versions, self._insert_tasks = versions.insert(), tasks.insert()
        # Keeps what this callback says about a known job; no row if an earlier callback said the same.
        self._add_version = self._dialect.insert(versions).on_conflict_do_nothing().returning(versions.c.id)

    def record(self, raw: RawRequest, callback: Callback, triaged: Sequence[Triaged]) -> Recorded:
        """Store the request, its jobs and, for each forwarded one, its version and verify task, in one transaction.

        Jobs are written in job id order, so two callbacks naming the same jobs in another order
        lock them in the same order and cannot deadlock. Everything is prepared before the
        transaction begins: on SQLite it holds the write lock, which every writer waits for.
        """
        now = utcnow()
        entries = dict(sorted({entry.job.job_id: entry for entry in reversed(triaged)}.items()))  # first of a twin
        rows = [_row(entry, callback.event_name[:64]) for entry in entries.values()]
        request = {
            "received_at": now, "remote_addr": raw.remote_addr[:64], "content_type": raw.content_type[:256],
            "headers": json.dumps(raw.headers, sort_keys=True), "raw_body": raw.body, "size": len(raw.body),
            "body_sha256": hashlib.sha256(raw.body).hexdigest(), "body_format": callback.body_format,
            "event_name": callback.event_name[:64],
        }  # fmt: skip
        forwarded, reopened = [row for row in rows if row["status"] == JobStatus.RECEIVED], []
        if (callback_id := self._record_new(request, rows)) is not None:
            inserted = set(entries)
        else:
            with self._engine.begin() as conn:
                callback_id = conn.execute(self._insert_callback, request).scalar_one()
                written = [row | {"callback_id": callback_id, "created_at": now, "updated_at": now} for row in rows]
                inserted = set(conn.execute(self._insert_jobs, written).scalars()) if rows else set()
                if fresh := [row for row in forwarded if row["job_id"] in inserted]:
                    conn.execute(self._insert_versions, [_version(row, callback_id, now) for row in fresh])
                    conn.execute(self._insert_tasks, [_task(r["job_id"], TaskKind.VERIFY, None, now) for r in fresh])
                for row in forwarded:
                    if row["job_id"] not in inserted and self._reopen(conn, row, callback_id, now):
                        reopened.append(row["job_id"])
                if fresh or reopened:
                    notify(conn)
        order = dict.fromkeys(entry.job.job_id for entry in triaged)  # answered in the callback's order
        new = [job_id for job_id in order if job_id in inserted or job_id in reopened]
        duplicates = [job_id for job_id in order if job_id not in new]
        ignored = [job_id for job_id in new if not entries[job_id].forward]
        return Recorded(int(callback_id), tuple(new), tuple(duplicates), tuple(ignored))

    def _record_new(self, request: dict[str, Any], rows: list[dict[str, Any]]) -> int | None:
        """PostgreSQL: the callback's id if it was recorded in one round trip (all its jobs new), else None."""
        if self._dialect is not postgresql:
            return None
        # One JSON document rather than an array per column: psycopg escapes arrays of text slowly.
        params = request | {"jobs": json.dumps(rows)}
        with self._engine.connect() as conn:
            # The driver's connection, autocommit for this statement: SQLAlchemy's execution cost more CPU.
            driver = conn.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            driver.autocommit = True
            try:
                found: tuple[int | None, int] | None = driver.execute(_RECORD_NEW, params).fetchone()
                return found[0] if found else None
            except psycopg.errors.UniqueViolation:
                return None  # another callback recorded one of the jobs since the statement began
            except psycopg.Error as exc:
                if driver.broken:
                    conn.invalidate()
                raise sa.exc.DBAPIError.instance(_RECORD_NEW, params, exc, psycopg.Error) from None
            finally:
                if not driver.closed:
                    driver.autocommit = False

    def replay(self, job_id: str, sinks: Sequence[str]) -> Replayed:
        """Verify the job again if it was rejected or its verification died; else deliver it again to ``sinks``."""
        now = utcnow()
        with self._engine.begin() as conn:
            row = conn.execute(sa.select(jobs.c.status).where(jobs.c.job_id == job_id).with_for_update()).first()
            if row is None:
                raise LedgerError(f"no job {job_id!r} in the ledger")
            if _unverified(conn, job_id, row.status):
                reverify(conn, job_id, now)
                notify(conn)
                return Replayed(job_id, verify=True, sinks=())
            if row.status not in (JobStatus.VERIFIED, JobStatus.DELIVERED, JobStatus.DEAD):
                raise LedgerError(f"job {job_id} is {row.status}: it is waiting for verification, nothing to replay")
            for sink in sinks:
                schedule(conn, job_id, TaskKind.DELIVER, sink, now)
            notify(conn)
            set_status(conn, job_id, JobStatus.VERIFIED, "", now)
        return Replayed(job_id, verify=False, sinks=tuple(sinks))

    def _reopen(self, conn: Connection, row: dict[str, Any], callback_id: int, now: datetime) -> bool:
        """Whether a callback for a known job gets it verified (again): a different version of a job that is
        not verified yet, or any callback for a job whose verification died. Other jobs keep what they have."""
        job_id = row["job_id"]
        status = conn.execute(sa.select(jobs.c.status).where(jobs.c.job_id == job_id).with_for_update()).scalar_one()
        dead_unverified = status == JobStatus.DEAD and _unverified(conn, job_id, status)
        if not dead_unverified and status not in (JobStatus.RECEIVED, JobStatus.REJECTED):
            return False
        if conn.execute(self._add_version, _version(row, callback_id, now)).first() is None and not dead_unverified:
            return False
        if status == JobStatus.RECEIVED:
            # A worker verifying the earlier versions loses its lease: the new run sees every version.
            schedule(conn, job_id, TaskKind.VERIFY, None, now)
        else:
            reverify(conn, job_id, now)
        return True


def schedule(conn: Connection, job_id: str, kind: TaskKind, sink: str | None, now: datetime) -> None:
    """Make the job's task of ``kind`` (for ``sink``) due now with a fresh budget, creating it if needed."""
    row = _task(job_id, kind, sink, now)
    which = (tasks.c.job_id == job_id, tasks.c.kind == kind, tasks.c.sink == row["sink"])
    fresh = {"locked_by": None, "locked_until": None, "done_at": None} | row
    if not conn.execute(tasks.update().where(*which).values(fresh)).rowcount:
        conn.execute(tasks.insert().values(row))


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
    deliveries = sa.select(tasks.c.id).where(tasks.c.job_id == job_id, tasks.c.kind == TaskKind.DELIVER)
    return conn.execute(deliveries.limit(1)).first() is None


def _row(entry: Triaged, event_name: str) -> dict[str, Any]:
    """The job as a row in ``jobs``, with its version's digest."""
    detail = json.dumps(job_to_dict(entry.job))
    return {"job_id": entry.job.job_id, "event_name": event_name, "tag": entry.job.tag[:64], "state": entry.job.state,
            "reason": entry.reason, "status": JobStatus.RECEIVED if entry.forward else JobStatus.IGNORED,
            "detail": detail, "digest": hashlib.sha256(detail.encode()).hexdigest()}  # fmt: skip


def _version(job: dict[str, Any], callback_id: int, now: datetime) -> dict[str, Any]:
    """What a callback says about a job (``job``: its :func:`_row`), as a row in ``job_versions``."""
    return job | {"callback_id": callback_id, "status": VersionStatus.PENDING, "reason": "", "received_at": now}


def _task(job_id: str, kind: TaskKind, sink: str | None, now: datetime) -> dict[str, Any]:
    return {"job_id": job_id, "kind": kind, "sink": JOB_WIDE if sink is None else sink, "status": TaskStatus.PENDING,
            "attempts": 0, "run_after": now, "last_error": "", "updated_at": now}  # fmt: skip
