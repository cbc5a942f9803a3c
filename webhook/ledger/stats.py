"""The ledger at a glance: how many jobs stand where, what is waiting, what died, who is working.

:meth:`Stats.snapshot` is read by the metrics endpoints (cached there for a few seconds) and is
meant for any overview page: one read-only connection, four aggregate statements, each served
by an index (``jobs(status)``; ``tasks(status, kind, sink, run_after)``) or by a table that
holds one row per running worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from webhook.ledger.breakers import Breaker, read
from webhook.ledger.errors import connect
from webhook.ledger.schema import jobs as job_rows
from webhook.ledger.schema import tasks, utcnow, workers
from webhook.ledger.workers import STALE_BEATS
from webhook.models import JobStatus, TaskKind, TaskStatus


class TaskGroup(NamedTuple):
    """Tasks of one kind for one sink: ``("verify", "")`` is verification, which belongs to no sink."""

    kind: str
    sink: str


@dataclass(frozen=True)
class LedgerStats:
    """What :meth:`Stats.snapshot` read, all at ``taken_at`` (naive UTC).

    ``groups`` lists every (kind, sink) that has due or dead tasks, plus verification always, so
    a consumer can show each of them with zeros where nothing is due or dead; ``due``,
    ``oldest_due_seconds`` and ``dead`` only hold the non-zero ones (read them with ``.get(group, 0)``).
    """

    taken_at: datetime
    jobs: dict[str, int]  # every JobStatus value, 0 included
    due: dict[TaskGroup, int]  # pending tasks a worker may claim now (not leased, run_after passed)
    oldest_due_seconds: dict[TaskGroup, float]  # how long the oldest of those has been due
    dead: dict[TaskGroup, int]  # tasks that ran out of attempts (or were refused for good)
    live_workers: int  # workers whose heartbeat is younger than STALE_BEATS intervals
    # Sinks' breakers that have left the closed state at least once (a sink without one is closed).
    breakers: dict[str, Breaker] = field(default_factory=dict)

    @property
    def groups(self) -> list[TaskGroup]:
        found = {TaskGroup(TaskKind.VERIFY.value, ""), *self.due, *self.dead}
        return sorted(found)


class Stats:
    """Aggregate reads over the whole ledger; none takes a write lock."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def snapshot(self, heartbeat_seconds: float = 5.0) -> LedgerStats:
        """Jobs per status, due and dead tasks per (kind, sink), live workers and sinks' breakers, read now.

        ``heartbeat_seconds`` is the workers' ``WEBHOOK_HEARTBEAT_SECONDS``: a worker counts as
        live while its last heartbeat is younger than three of them.
        """
        now = utcnow()
        due_now = sa.and_(
            tasks.c.status == TaskStatus.PENDING,
            tasks.c.run_after <= now,
            sa.or_(tasks.c.locked_until.is_(None), tasks.c.locked_until < now),
        )
        group = (tasks.c.kind, tasks.c.sink)
        with connect(self._engine) as conn:
            by_status = conn.execute(sa.select(job_rows.c.status, sa.func.count()).group_by(job_rows.c.status)).all()
            due_rows = conn.execute(
                sa.select(*group, sa.func.count(), sa.func.min(tasks.c.run_after)).where(due_now).group_by(*group)
            ).all()
            dead_rows = conn.execute(
                sa.select(*group, sa.func.count()).where(tasks.c.status == TaskStatus.DEAD).group_by(*group)
            ).all()
            since = now - timedelta(seconds=heartbeat_seconds * STALE_BEATS)
            live = conn.execute(
                sa.select(sa.func.count()).select_from(workers).where(workers.c.heartbeat_at >= since)
            ).scalar_one()
            breakers = read(conn)
        jobs = dict.fromkeys((status.value for status in JobStatus), 0)
        jobs.update({status: int(n) for status, n in by_status})
        return LedgerStats(
            taken_at=now,
            jobs=jobs,
            due={TaskGroup(kind, sink): int(n) for kind, sink, n, _ in due_rows},
            oldest_due_seconds={
                TaskGroup(kind, sink): max(0.0, (now - oldest).total_seconds()) for kind, sink, _, oldest in due_rows
            },
            dead={TaskGroup(kind, sink): int(n) for kind, sink, n in dead_rows},
            live_workers=int(live),
            breakers=breakers,
        )
