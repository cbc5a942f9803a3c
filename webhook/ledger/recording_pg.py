"""Recording a callback on PostgreSQL: one statement does all of it (see :mod:`webhook.ledger.recording`).

Ingest speed is the reason: a callback whose jobs are all new, the usual case, is one round trip,
sent on the driver's connection in autocommit (SQLAlchemy's execution cost more CPU than the
statement). A callback naming a known job needs that job's row locked before the statement reads
it: what the statement decides from it (verify it again or not) must still hold when it commits.
So the statement records nothing while a job it finds is not locked by its own transaction; the
known jobs are then locked first, and the statement runs again after the lock in the same transaction.
Their verify tasks are locked next, in task id order: a worker renewing its leases writes the same
rows, and every transaction that writes several tasks takes them in that order.

Two callbacks recording the same new job at once collide on its key: the one that lost locks the
job and runs again, so no caller ever sees that race.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psycopg
from sqlalchemy.engine import Engine

from webhook.ledger.errors import LedgerUnavailable, connect
from webhook.ledger.recording import Prepared, Recorded
from webhook.ledger.schema import JOB_WIDE
from webhook.ledger.wakeup import CHANNEL
from webhook.models import JobStatus, TaskKind, TaskStatus, VersionStatus

RECEIVED, REJECTED, DEAD = (f"'{status}'" for status in (JobStatus.RECEIVED, JobStatus.REJECTED, JobStatus.DEAD))
PENDING, CAPPED = (f"'{status}'" for status in (VersionStatus.PENDING, VersionStatus.CAPPED))

# What the SQLite path does statement by statement (recording.SqliteRecording), as one statement.
# Its CTEs all see the ledger as it was when the statement began: hence the locks taken before.
# Formatted with constants only.
_RECORD = f"""
WITH input AS (SELECT * FROM ROWS FROM (json_to_recordset(CAST(%(jobs)s AS json)) AS (job_id text, tag text,
    state text, status text, reason text, detail text, digest text)) WITH ORDINALITY AS i (job_id, tag, state,
    status, reason, detail, digest, n)
), known AS (  -- looked up job by job: a join would read the whole table (json_to_recordset looks large)
    SELECT * FROM (SELECT i.job_id, (SELECT j.status FROM jobs AS j WHERE j.job_id = i.job_id) AS status,
        i.status AS wanted, i.digest, i.detail FROM input AS i) AS k WHERE status IS NOT NULL
), go AS (  -- only_new: any job known stops it (Recording.store_new); else one not locked does
    SELECT WHERE NOT EXISTS (SELECT FROM known WHERE %(only_new)s OR job_id <> ALL (CAST(%(locked)s AS text[])))
), holder AS (SELECT id FROM callbacks WHERE sha256 = %(body_sha256)s AND body_of IS NULL LIMIT 1
), stored AS (
    INSERT INTO callbacks (received_at, remote_addr, content_type, headers, body, body_format, event_name, sha256,
        size, body_of)
    SELECT %(received_at)s, %(remote_addr)s, %(content_type)s, %(headers)s,
        CASE WHEN holder.id IS NULL THEN %(raw_body)s ELSE '' END, %(body_format)s, %(event_name)s, %(body_sha256)s,
        %(size)s, holder.id
    FROM go LEFT JOIN holder ON true
    RETURNING id, received_at AS at
), new_jobs AS (
    INSERT INTO jobs (job_id, callback_id, event_name, tag, state, status, reason, detail, created_at, updated_at)
    SELECT i.job_id, s.id, %(event_name)s, i.tag, i.state, i.status, i.reason, i.detail, s.at, s.at
    FROM stored AS s, input AS i WHERE i.job_id NOT IN (SELECT job_id FROM known) ORDER BY i.n
    RETURNING job_id, status
), reopening AS (  -- a known job that this callback may get verified (again): SqliteRecording._reopen
    SELECT job_id, status, digest, detail, status = {DEAD} AND NOT EXISTS (
        SELECT FROM tasks AS t WHERE t.job_id = k.job_id AND t.kind = '{TaskKind.DELIVER}') AS dead_unverified,
        (SELECT count(*) FROM job_versions AS v WHERE v.job_id = k.job_id AND v.status <> {CAPPED})
            >= %(max_versions)s AS over_cap
    FROM known AS k WHERE wanted = {RECEIVED}
), new_versions AS (
    INSERT INTO job_versions (job_id, callback_id, digest, detail, status, reason, received_at)
    SELECT v.job_id, s.id, v.digest, v.detail, CASE WHEN over_cap THEN {CAPPED} ELSE {PENDING} END,
        CASE WHEN over_cap THEN %(capped_reason)s ELSE '' END, s.at FROM stored AS s, (
        SELECT i.job_id, i.digest, i.detail, false AS over_cap FROM input AS i JOIN new_jobs USING (job_id)
        WHERE i.status = {RECEIVED}
        UNION ALL
        SELECT job_id, digest, detail, over_cap FROM reopening
        WHERE dead_unverified OR status IN ({RECEIVED}, {REJECTED})
    ) AS v
    ON CONFLICT DO NOTHING RETURNING job_id, status
), reopened AS (
    SELECT job_id, status FROM reopening
    WHERE dead_unverified OR job_id IN (SELECT job_id FROM new_versions WHERE status = {PENDING})
), reverified AS (
    UPDATE job_versions AS v SET status = {PENDING}, reason = ''
    FROM reopened AS r WHERE v.job_id = r.job_id AND r.status <> {RECEIVED} AND v.status <> {CAPPED}
), received_again AS (
    UPDATE jobs AS j SET status = {RECEIVED}, reason = '', updated_at = s.at
    FROM stored AS s, reopened AS r WHERE j.job_id = r.job_id AND r.status <> {RECEIVED}
), due AS (
    INSERT INTO tasks (job_id, kind, sink, status, attempts, run_after, last_error, updated_at)
    SELECT v.job_id, '{TaskKind.VERIFY}', '{JOB_WIDE}', '{TaskStatus.PENDING}', 0, s.at, '', s.at FROM stored AS s, (
        SELECT job_id FROM new_jobs WHERE status = {RECEIVED} UNION ALL SELECT job_id FROM reopened
    ) AS v
    ON CONFLICT (job_id, kind, sink) DO UPDATE SET status = excluded.status, attempts = 0,
        run_after = excluded.run_after, locked_until = NULL, locked_by = NULL, last_error = '',
        updated_at = excluded.updated_at, done_at = NULL
    RETURNING id
)
SELECT (SELECT id FROM stored), ARRAY(SELECT job_id FROM new_jobs), ARRAY(SELECT job_id FROM reopened),
    ARRAY(SELECT job_id FROM new_versions WHERE status = {CAPPED}),
    (SELECT count(pg_notify('{CHANNEL}:' || current_schema(), '')) FROM (SELECT FROM due LIMIT 1) AS d)
"""  # noqa: S608
_LOCK = "SELECT job_id FROM jobs WHERE job_id = ANY (%(ids)s) ORDER BY job_id FOR UPDATE"
_LOCK_TASKS = f"SELECT FROM tasks WHERE job_id = ANY (%(ids)s) AND kind = '{TaskKind.VERIFY}' ORDER BY id FOR UPDATE"
# Each round that finds a job unlocked lost a race with the callback that recorded it, and locks it
# the next time: more rounds than this means callbacks keep recording the same jobs at once.
_LOCKING_ROUNDS = 3

Driver = psycopg.Connection[tuple[Any, ...]]


class PostgresRecording:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def store(self, prepared: Prepared) -> Recorded:
        ids = [row["job_id"] for row in prepared.rows]
        found = self._run(
            prepared, False, lambda driver, params: _all_new(driver, params) or _with_known(driver, params, ids)
        )
        if found is None:
            where = self._engine.url.render_as_string(hide_password=True)
            raise LedgerUnavailable("UniqueViolation", "other callbacks kept recording the same jobs at once", where)
        return _answer(prepared, found)

    def store_new(self, prepared: Prepared) -> Recorded | None:
        # One statement, all or nothing: it stores nothing when it finds a job known, and fails on a
        # job's key when another recording committed that job meanwhile. Either way, None.
        found = self._run(prepared, True, _all_new)
        return None if found is None else _answer(prepared, found)

    def _run(
        self, prepared: Prepared, only_new: bool, record: Callable[[Driver, dict[str, Any]], tuple[Any, ...] | None]
    ) -> tuple[Any, ...] | None:
        """``record`` on a driver connection, with the statement's parameters for ``prepared``."""
        # One JSON document rather than an array per column: psycopg escapes arrays of text slowly.
        params = prepared.request | {
            "jobs": json.dumps(prepared.rows),
            "only_new": only_new,
            "max_versions": prepared.max_versions,
            "capped_reason": prepared.capped_reason,
        }
        with connect(self._engine) as conn:
            driver = conn.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            try:
                return record(driver, params)
            except psycopg.Error:
                if driver.broken:
                    conn.invalidate()
                raise


def _all_new(driver: Driver, params: dict[str, Any]) -> tuple[Any, ...] | None:
    """Every job new: recorded by one statement, a transaction of its own. None if one is known."""
    driver.autocommit = True
    try:
        return _recorded(driver.execute(_RECORD, params | {"locked": []}).fetchone())
    except psycopg.errors.UniqueViolation:
        return None  # another callback recorded one of the jobs since the statement began
    finally:
        if not driver.closed:
            driver.autocommit = False


def _with_known(driver: Driver, params: dict[str, Any], ids: list[str]) -> tuple[Any, ...] | None:
    """Lock the known jobs, then record in the same transaction. None if other callbacks kept winning."""
    for _ in range(_LOCKING_ROUNDS):
        try:
            locked = [job_id for (job_id,) in driver.execute(_LOCK, {"ids": ids})]
            driver.execute(_LOCK_TASKS, {"ids": locked})
            found = _recorded(driver.execute(_RECORD, params | {"locked": locked}).fetchone())
        except psycopg.errors.UniqueViolation:
            found = None  # a job unknown to the lock was recorded before this statement could
        if found is not None:
            driver.commit()
            return found
        driver.rollback()  # a job was recorded after the lock was taken: lock it too
    return None


def _answer(prepared: Prepared, found: tuple[Any, ...]) -> Recorded:
    callback_id, inserted, reopened, capped, _ = found
    return prepared.answer(callback_id, set(inserted), set(reopened), set(capped))


def _recorded(found: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """The statement's answer (callback id, new jobs, jobs verified again, jobs capped, notified), if it
    recorded anything."""
    return found if found is not None and found[0] is not None else None
