"""The work queue: tasks are claimed with a lease, then closed with their outcome.

A claim leases one verify task, or every due delivery of one job (one fetch serves them all).
A crashed worker's lease runs out and its tasks become due again. Every outcome is recorded
only if the worker still holds the lease, so a worker that lost it cannot overwrite the new
owner's result. On PostgreSQL claims skip rows other workers hold (``FOR UPDATE SKIP LOCKED``);
on SQLite the write lock is taken when the transaction begins.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from webhook.ledger.breakers import Health, observe
from webhook.ledger.claims import Attempt, Claim, DeliveryClaim, Room, Task, VerifyClaim, Version
from webhook.ledger.errors import begin
from webhook.ledger.history import record_attempts
from webhook.ledger.lanes import claim_lanes, lease_new_deliveries
from webhook.ledger.leasing import claim_due
from webhook.ledger.scheduling import in_id_order, set_status, settle
from webhook.ledger.schema import jobs, tasks, utcnow, versions
from webhook.models import Job, JobStatus, TaskKind, TaskStatus, VersionStatus, job_to_json

Verdicts = Mapping[int | None, str]  # version id -> why it was rejected
Attempts = Sequence[Attempt]  # what the worker tried, recorded with the outcome it led to


class Queue:
    """Claiming due tasks, keeping their leases, and recording what became of them."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def claim(self, worker_id: str, lease_seconds: float) -> Claim | None:
        """Lease the next due work: a verify task, or every due delivery of one job."""
        claims = self.claim_many(worker_id, lease_seconds, 1)
        return claims[0] if claims else None

    def claim_many(self, worker_id: str, lease_seconds: float, limit: int) -> list[Claim]:
        """Lease due work of up to ``limit`` jobs in one transaction, each job as its own claim, with
        every due delivery of the job whatever its sink's slots or breaker (a worker's claim loop
        uses :meth:`claim_lanes`)."""
        now = utcnow()
        with begin(self._engine) as conn:
            return claim_due(conn, worker_id, now + timedelta(seconds=lease_seconds), now, limit)

    def claim_lanes(self, worker_id: str, lease_seconds: float, room: Room) -> list[Claim]:
        """Lease due work in one transaction as a worker's free slots allow (``room``), each job as
        its own claim; a sink whose breaker is open is left out (see :mod:`webhook.ledger.lanes`)."""
        now = utcnow()
        with begin(self._engine) as conn:
            return claim_lanes(conn, worker_id, now + timedelta(seconds=lease_seconds), now, room)

    def extend_lease(self, task_ids: Sequence[int], worker_id: str, lease_seconds: float) -> int:
        """Keep a long step's lease alive; returns how many tasks were renewed.

        A task another transaction holds right now (a callback making it due again, which takes the
        lease away) is skipped rather than waited for: renewal never waits on a receiver, so the two
        cannot deadlock. Renewed every third of a lease (:class:`~webhook.worker.liveness.Leases`),
        a skipped task is renewed on the next pass, with a third of its lease still to run after that.
        """
        now = utcnow()
        mine = sa.and_(tasks.c.id.in_(task_ids), tasks.c.locked_by == worker_id)
        with begin(self._engine) as conn:
            return conn.execute(
                tasks.update()
                .where(in_id_order(mine, skip_locked=True))
                .values(locked_until=now + timedelta(seconds=lease_seconds))
            ).rowcount

    def accept_and_claim(
        self,
        claim: VerifyClaim,
        worker_id: str,
        sinks: Sequence[str],
        accepted: Version,
        job: Job,
        rejected: Verdicts,
        tried: Attempts,
        lease_seconds: float,
        lease: Collection[str] | None = None,
    ) -> DeliveryClaim | None:
        """Verification passed for ``accepted`` (``job``, decoded): the job goes on as that version, the
        other versions are ``rejected`` with their reasons, and one delivery per sink is leased to the
        same worker in the same transaction, which goes on to fetch and deliver without a second
        claim: those of the sinks in ``lease`` (None: every sink) whose breaker is closed; the others
        wait for a claim. None if the lease was lost or no delivery was leased."""
        now = utcnow()
        until = now + timedelta(seconds=lease_seconds)
        # CI's account of the job, as verification confirmed it: the row keeps it and its deliveries send it.
        detail = job_to_json(job)
        with begin(self._engine) as conn:
            _lock_job(conn, claim.task.job_id)
            if not _accept(conn, claim.task, worker_id, sinks, accepted, job, detail, rejected, tried, now):
                return None
            job_id, claimed = claim.task.job_id, (detail, claim.received_at)
            return lease_new_deliveries(conn, job_id, sinks, lease, worker_id, until, now, claimed)

    def reject(self, task: Task, worker_id: str, reason: str, rejected: Verdicts, tried: Attempts = ()) -> bool:
        """Verification refused every version (``rejected``, with reasons): never fetched nor forwarded."""
        now = utcnow()
        with begin(self._engine) as conn:
            _lock_job(conn, task.job_id)
            if not _close(conn, task, worker_id, TaskStatus.DONE, reason, now, tried):
                return False
            _record_verdicts(conn, rejected, VersionStatus.REJECTED)
            set_status(conn, task.job_id, JobStatus.REJECTED, reason, now)
        return True

    def complete(self, task: Task, worker_id: str, tried: Attempts = (), health: Health | None = None) -> bool:
        """The delivery happened; the job is delivered once none of its deliveries is pending.

        ``health`` (here and below): what the outcome says of the delivery's sink, for its breaker."""
        now = utcnow()
        with begin(self._engine) as conn:
            _lock_job(conn, task.job_id)
            if not _close(conn, task, worker_id, TaskStatus.DONE, "", now, tried):
                return False
            settle(conn, task.job_id, now)
            _observe(conn, health, now)
        return True

    def retry_later(
        self, task: Task, worker_id: str, error: str, delay: float, tried: Attempts = (), health: Health | None = None
    ) -> bool:
        """The step failed but may succeed later: due again after ``delay`` seconds."""
        now = utcnow()
        with begin(self._engine) as conn:
            record_attempts(conn, task.job_id, worker_id, tried)
            updated = conn.execute(
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
            if updated:
                _observe(conn, health, now)
        return updated == 1

    def give_up(
        self, task: Task, worker_id: str, error: str, tried: Attempts = (), health: Health | None = None
    ) -> bool:
        """Retrying cannot help, or the budget is spent: the task is dead, and so is the job."""
        now = utcnow()
        with begin(self._engine) as conn:
            _lock_job(conn, task.job_id)
            if not _close(conn, task, worker_id, TaskStatus.DEAD, error, now, tried):
                return False
            if task.kind == TaskKind.VERIFY:
                set_status(conn, task.job_id, JobStatus.DEAD, f"verification gave up: {error}", now)
            else:
                settle(conn, task.job_id, now)
            _observe(conn, health, now)
        return True


def _accept(
    conn: Connection,
    task: Task,
    worker_id: str,
    sinks: Sequence[str],
    accepted: Version,
    job: Job,
    detail: str,
    rejected: Verdicts,
    tried: Attempts,
    now: datetime,
) -> bool:
    if not _close(conn, task, worker_id, TaskStatus.DONE, "", now, tried):
        return False
    conn.execute(
        jobs.update()
        .where(jobs.c.job_id == task.job_id)
        .values(
            detail=detail,
            tag=job.tag[:64],
            state=job.state,
            status=JobStatus.VERIFIED,
            reason="",
            updated_at=now,
        )
    )
    _record_verdicts(conn, {accepted.id: ""}, VersionStatus.ACCEPTED)
    _record_verdicts(conn, rejected, VersionStatus.REJECTED)
    if not sinks:
        status, failure = (JobStatus.FAILED, f"{job.failure}; ") if job.failure else (JobStatus.DELIVERED, "")
        set_status(conn, task.job_id, status, f"{failure}no sink takes this event", now)
    return True


def _observe(conn: Connection, health: Health | None, now: datetime) -> None:
    if health is not None:
        observe(conn, health, now)


_VERDICT = (
    versions.update()
    .where(versions.c.id == sa.bindparam("version_id"))
    .values(status=sa.bindparam("verdict"), reason=sa.bindparam("why"))
)


def _record_verdicts(conn: Connection, verdicts: Verdicts, status: VersionStatus) -> None:
    # One statement for all (a job may have hundreds): callbacks for the job wait on its row meanwhile.
    rows = [{"version_id": v, "verdict": status, "why": why} for v, why in verdicts.items() if v is not None]
    if rows:
        conn.execute(_VERDICT, rows)


def _close(
    conn: Connection, task: Task, worker_id: str, status: TaskStatus, error: str, now: datetime, tried: Attempts
) -> bool:
    """Close a task only if this worker still holds its lease (its attempts are history either way)."""
    record_attempts(conn, task.job_id, worker_id, tried)
    closed = conn.execute(
        tasks.update()
        .where(tasks.c.id == task.id, tasks.c.locked_by == worker_id, tasks.c.status == TaskStatus.PENDING)
        .values(status=status, last_error=error, locked_by=None, locked_until=None, done_at=now, updated_at=now)
    ).rowcount
    return closed == 1


def _lock_job(conn: Connection, job_id: str) -> None:
    """Lock the job row before anything else in a transaction that settles it or decides its verification.

    Jobs before tasks is the ledger's one lock order (see :mod:`webhook.ledger.scheduling`): a
    callback for the job locks the job, then its verify task, so a worker that locked the task
    first and then wrote the job would deadlock with it.

    Two workers may each finish one of the job's deliveries at the same moment. Under READ
    COMMITTED neither would see the other's "done" and the job would stay verified forever;
    locking the job row makes the second wait for the first commit, then see it. It must come
    first: recording an attempt takes a share lock on the job row (its foreign key), and two
    transactions each holding one while asking for the row lock would deadlock.
    """
    conn.execute(sa.select(jobs.c.job_id).where(jobs.c.job_id == job_id).with_for_update())
