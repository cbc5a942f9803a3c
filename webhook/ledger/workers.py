"""Live workers: heartbeat rows, and taking over the leases of workers that stopped beating."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from webhook.ledger.errors import begin, connect
from webhook.ledger.scheduling import in_id_order
from webhook.ledger.schema import tasks, utcnow, workers
from webhook.models import TaskStatus

STALE_BEATS = 3  # a worker silent for this many heartbeat intervals is taken for dead


@dataclass(frozen=True)
class TakenOver:
    """What :meth:`Workers.take_over` found: dead workers (their rows removed) and leases released."""

    dead: tuple[str, ...]
    released: int


@dataclass(frozen=True)
class WorkerView:
    id: str
    host: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime


class Workers:
    """Each worker renews its row; a row that is stale, or names a process gone from this host, is dead."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def beat(self, worker_id: str, host: str, pid: int) -> None:
        """Record that ``worker_id`` is alive now (its first beat registers it)."""
        now = utcnow()
        with begin(self._engine) as conn:
            renewed = conn.execute(workers.update().where(workers.c.id == worker_id).values(heartbeat_at=now)).rowcount
            if not renewed:
                conn.execute(
                    workers.insert().values(id=worker_id, host=host, pid=pid, started_at=now, heartbeat_at=now)
                )

    def leave(self, worker_id: str) -> int:
        """A worker stopping: its row goes, and so do the leases it still holds; returns how many."""
        with begin(self._engine) as conn:
            conn.execute(workers.delete().where(workers.c.id == worker_id))
            held = sa.and_(tasks.c.locked_by == worker_id, tasks.c.status == TaskStatus.PENDING)
            return conn.execute(
                tasks.update().where(in_id_order(held)).values(locked_by=None, locked_until=None)
            ).rowcount

    def take_over(self, stale_after: float, host: str, pid_alive: Callable[[int], bool]) -> TakenOver:
        """Remove workers silent for ``stale_after`` seconds, or whose process on ``host`` is gone, and
        release every lease held by a worker without a row: those tasks are due again at once."""
        now = utcnow()
        with begin(self._engine) as conn:
            rows = conn.execute(sa.select(workers.c.id, workers.c.host, workers.c.pid, workers.c.heartbeat_at)).all()
            stale = now - timedelta(seconds=stale_after)
            dead = tuple(r.id for r in rows if r.heartbeat_at < stale or (r.host == host and not pid_alive(r.pid)))
            if dead:
                conn.execute(workers.delete().where(workers.c.id.in_(dead)))
            orphaned = sa.and_(
                tasks.c.status == TaskStatus.PENDING,
                tasks.c.locked_by.is_not(None),
                tasks.c.locked_by.not_in(sa.select(workers.c.id)),
            )
            released = conn.execute(
                tasks.update().where(in_id_order(orphaned)).values(locked_by=None, locked_until=None)
            ).rowcount
        return TakenOver(dead, released)

    def live(self) -> list[WorkerView]:
        with connect(self._engine) as conn:
            rows = conn.execute(sa.select(workers).order_by(workers.c.started_at)).all()
        return [WorkerView(r.id, r.host, r.pid, r.started_at, r.heartbeat_at) for r in rows]
