"""Retention: finished jobs past their time leave the ledger, in batches small enough that ingest never waits.

Only finished jobs go (delivered, rejected, ignored), with their tasks, attempts and versions,
then the callbacks no remaining job or version names. Dead and undelivered work stays until an
operator replays or prunes it by hand: losing it silently is what the ledger exists to prevent.
Expired dashboard sessions and forgotten wrong logins go on the same round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from webhook.ledger.errors import begin, connect
from webhook.ledger.schema import attempts, callbacks, jobs, tasks, versions
from webhook.ledger.sessions import Sessions
from webhook.models import JobStatus

FINISHED = (JobStatus.DELIVERED, JobStatus.FAILED, JobStatus.REJECTED, JobStatus.IGNORED)
BATCH = 200  # rows per transaction: each holds the write lock only briefly


@dataclass
class Pruned:
    """Rows removed (or, for a dry run, that would be)."""

    jobs: int = 0
    callbacks: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # per table, jobs and callbacks included
    sessions: int = 0  # expired dashboard sessions and forgotten wrong logins (not part of a dry run)

    def line(self) -> str:
        """``3 jobs and 2 callbacks (with attempts 9, job_versions 3, tasks 6)``: each table named once."""
        others = sorted((table, n) for table, n in self.rows.items() if table not in ("jobs", "callbacks"))
        detail = ", ".join(f"{table} {n}" for table, n in others)
        return f"{self.jobs} jobs and {self.callbacks} callbacks" + (f" (with {detail})" if detail else "")


class Retention:
    """Prune what is finished and older than a cutoff."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def prune(self, before: datetime, batch: int = BATCH, progress: Callable[[Pruned], None] | None = None) -> Pruned:
        """Remove finished jobs last changed before ``before``, and callbacks received before it
        that nothing left names; one short transaction per ``batch`` rows, each followed by
        ``progress`` with what is gone so far."""
        pruned = Pruned()
        while found := self._finished_jobs(before, batch):
            with begin(self._engine) as conn:
                # Jobs before their tasks, as every writer locks them (a callback for one of these
                # jobs locks it, then its tasks); and only those still finished once locked.
                still = sa.select(jobs.c.job_id).where(jobs.c.job_id.in_(found), _finished(before))
                ids = list(conn.execute(still.order_by(jobs.c.job_id).with_for_update()).scalars())
                for table in (attempts, tasks, versions, jobs):
                    gone = conn.execute(table.delete().where(table.c.job_id.in_(ids))).rowcount
                    pruned.rows[table.name] = pruned.rows.get(table.name, 0) + gone
            pruned.jobs += len(ids)
            if progress:
                progress(pruned)
        while numbers := self._unnamed_callbacks(before, batch):
            with begin(self._engine) as conn:
                pruned.callbacks += conn.execute(callbacks.delete().where(callbacks.c.id.in_(numbers))).rowcount
            if progress:
                progress(pruned)
        pruned.rows["callbacks"] = pruned.callbacks
        pruned.sessions = Sessions(self._engine).prune()
        return pruned

    def would_prune(self, before: datetime) -> Pruned:
        """What :meth:`prune` would remove now, counted without a write."""
        job_ids = sa.select(jobs.c.job_id).where(_finished(before))
        with connect(self._engine) as conn:
            rows = {
                table.name: conn.execute(
                    sa.select(sa.func.count()).select_from(table).where(table.c.job_id.in_(job_ids))
                ).scalar_one()
                for table in (attempts, tasks, versions, jobs)
            }
            kept = sa.select(jobs.c.job_id).where(sa.not_(_finished(before)))
            named = sa.union(
                sa.select(jobs.c.callback_id).where(jobs.c.job_id.in_(kept)),
                sa.select(versions.c.callback_id).where(versions.c.job_id.in_(kept)),
            )
            rows["callbacks"] = conn.execute(
                sa.select(sa.func.count())
                .select_from(callbacks)
                .where(callbacks.c.received_at < before, callbacks.c.id.not_in(named))
            ).scalar_one()
        return Pruned(jobs=rows["jobs"], callbacks=rows["callbacks"], rows=rows)

    def _finished_jobs(self, before: datetime, batch: int) -> list[str]:
        with connect(self._engine) as conn:
            query = sa.select(jobs.c.job_id).where(_finished(before)).limit(batch)
            return list(conn.execute(query).scalars())

    def _unnamed_callbacks(self, before: datetime, batch: int) -> list[int]:
        """Callbacks received before ``before`` that no job, version or repeated callback points at."""
        named = sa.union(
            sa.select(jobs.c.callback_id),
            sa.select(versions.c.callback_id),
            sa.select(callbacks.c.body_of).where(callbacks.c.body_of.is_not(None)),
        )
        query = sa.select(callbacks.c.id).where(callbacks.c.received_at < before, callbacks.c.id.not_in(named))
        with connect(self._engine) as conn:
            return [int(n) for n in conn.execute(query.limit(batch)).scalars()]


def _finished(before: datetime) -> sa.ColumnElement[bool]:
    return sa.and_(jobs.c.status.in_(FINISHED), jobs.c.updated_at < before)
