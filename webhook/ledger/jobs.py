"""Jobs as a whole: recorded from callbacks (each distinct one a version), verified again, replayed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from webhook.ledger.claims import Attempt
from webhook.ledger.errors import LedgerError, UnknownJob, begin, connect
from webhook.ledger.history import record_attempts
from webhook.ledger.recording import MAX_VERSIONS_PER_JOB, RawRequest, Recorded, Recording, SqliteRecording, prepare
from webhook.ledger.recording_pg import PostgresRecording
from webhook.ledger.scheduling import reverify, schedule, set_status, unverified
from webhook.ledger.schema import jobs, utcnow
from webhook.ledger.wakeup import notify
from webhook.models import Callback, JobStatus, Outcome, Step, TaskKind, Triaged

_IDS_PER_QUERY = 500  # well under every database's limit of bound parameters


@dataclass(frozen=True)
class Replayed:
    """What a replay scheduled: the job's verification again, or deliveries to ``sinks``."""

    job_id: str
    verify: bool
    sinks: tuple[str, ...]


class Jobs:
    """Writes that concern a job as a whole, and which jobs the ledger has."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        postgres = engine.dialect.name == "postgresql"
        self._recording: Recording = PostgresRecording(engine) if postgres else SqliteRecording(engine)

    def record(
        self,
        raw: RawRequest,
        callback: Callback,
        triaged: Sequence[Triaged],
        max_versions: int = MAX_VERSIONS_PER_JOB,
    ) -> Recorded:
        """Store the request, its jobs and, for each forwarded one, its version and verify task, in one transaction.

        A known job's new version is verified only while the job has fewer than ``max_versions``;
        past that it is kept unverified (capped, see :mod:`webhook.ledger.recording`).

        Raises :class:`~webhook.ledger.errors.LedgerUnavailable` when nothing was stored and trying
        again later may succeed, and its :class:`~webhook.ledger.errors.LedgerRefused` when the
        database cannot hold what the callback says (it never will).
        """
        return self._recording.store(prepare(raw, callback, triaged, utcnow(), max_versions))

    def record_new(self, raw: RawRequest, callback: Callback, triaged: Sequence[Triaged]) -> Recorded | None:
        """:meth:`record`, only if the ledger knows none of the callback's jobs; else nothing is stored (None).

        Decided in the recording's own transaction, so recordings of the same jobs at once store
        them once: for a callback nobody sent (reconcile's), where a duplicate is only noise.
        """
        # Every job new: none has a version yet, so no cap applies.
        return self._recording.store_new(prepare(raw, callback, triaged, utcnow(), MAX_VERSIONS_PER_JOB))

    def known(self, job_ids: Sequence[str]) -> set[str]:
        """Which of ``job_ids`` the ledger has (read-only, a few hundred ids per query)."""
        found: set[str] = set()
        with connect(self._engine) as conn:
            for first in range(0, len(job_ids), _IDS_PER_QUERY):
                chunk = job_ids[first : first + _IDS_PER_QUERY]
                found.update(conn.execute(sa.select(jobs.c.job_id).where(jobs.c.job_id.in_(chunk))).scalars())
        return found

    def replay(self, job_id: str, sinks: Sequence[str], by: str = "replay") -> Replayed:
        """Verify the job again if it was rejected or its verification died; else deliver it again to ``sinks``.

        The timeline gets a ``replayed`` mark in each step's lane, naming ``by`` (who asked) as its
        worker: the attempts that follow it there are the replay's.
        """
        now = utcnow()
        with begin(self._engine) as conn:
            row = conn.execute(sa.select(jobs.c.status).where(jobs.c.job_id == job_id).with_for_update()).first()
            if row is None:
                raise UnknownJob(job_id)
            if unverified(conn, job_id, row.status):
                reverify(conn, job_id, now)
                record_attempts(conn, job_id, by, [Attempt(Step.VERIFY, "", now, 0, Outcome.REPLAYED)])
                notify(conn)
                return Replayed(job_id, verify=True, sinks=())
            if row.status not in (JobStatus.VERIFIED, JobStatus.DELIVERED, JobStatus.FAILED, JobStatus.DEAD):
                raise LedgerError(f"job {job_id} is {row.status}: it is waiting for verification, nothing to replay")
            for sink in sinks:
                schedule(conn, job_id, TaskKind.DELIVER, sink, now)
            record_attempts(conn, job_id, by, [Attempt(Step.DELIVER, sink, now, 0, Outcome.REPLAYED) for sink in sinks])
            notify(conn)
            set_status(conn, job_id, JobStatus.VERIFIED, "", now)
        return Replayed(job_id, verify=False, sinks=tuple(sinks))
