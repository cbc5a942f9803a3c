"""Leasing by lane: verifications, and each sink's deliveries, up to the slots a worker has free
for each, inside the caller's transaction.

Each lane is its own queue of due tasks, read oldest first through the ``(status, kind, sink,
run_after)`` index: a sink whose slots are all taken (a slow or hanging downstream) is not
asked for at all, and its backlog never crowds the other lanes out of a claim. A sink whose
breaker is open (:mod:`webhook.ledger.breakers`) is left out too, and once its pause is over
one delivery of it is leased as the probe. A claim costs one statement per lane with room,
however many jobs it leases.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from webhook.ledger.breakers import admitted, probing, read
from webhook.ledger.claims import Claim, DeliveryClaim, Room
from webhook.ledger.leasing import BROKEN, DUE, deliveries_of, lease_tasks, lease_unreadable
from webhook.ledger.readable import TASK_COLUMNS, task_problem
from webhook.ledger.schema import JOB_WIDE, tasks
from webhook.models import TaskKind, TaskStatus

_DUE_IN_LANE = (
    sa.select(tasks.c.id, tasks.c.job_id, tasks.c.kind, tasks.c.sink, *TASK_COLUMNS)
    .where(DUE, tasks.c.kind == sa.bindparam("kind"), tasks.c.sink == sa.bindparam("sink"))
    .order_by(tasks.c.run_after, tasks.c.id)
    .limit(sa.bindparam("limit", type_=sa.Integer))
    .with_for_update(skip_locked=True)
)
_RESET = ("status", "attempts", "run_after", "locked_until", "locked_by", "last_error", "updated_at", "done_at")


def _insert_or_restart(insert: postgresql.Insert | sqlite.Insert) -> Any:
    return insert.on_conflict_do_update(
        index_elements=[tasks.c.job_id, tasks.c.kind, tasks.c.sink],
        set_={name: insert.excluded[name] for name in _RESET},
    ).returning(tasks.c.id, tasks.c.sink, tasks.c.attempts, tasks.c.locked_by)


_LEASED_ANEW = {
    "postgresql": _insert_or_restart(postgresql.insert(tasks)),
    "sqlite": _insert_or_restart(sqlite.insert(tasks)),
}


def claim_lanes(conn: Connection, worker_id: str, until: datetime, now: datetime, room: Room) -> list[Claim]:
    """Lease due verifications and deliveries, oldest first in each lane, as ``room`` allows: one
    claim per job (a job's deliveries leased now are one claim; those of a sink without room wait)."""
    allowed, probes = admitted(conn, room.sinks, now)
    lanes = [(TaskKind.VERIFY, JOB_WIDE, room.verify), *((TaskKind.DELIVER, s, n) for s, n in allowed.items())]
    due: list[Any] = []
    unreadable: list[Any] = []  # due, but a column of theirs cannot be read
    for kind, sink, limit in lanes:
        if limit > 0:
            for row in conn.execute(_DUE_IN_LANE, {"now": now, "kind": kind, "sink": sink, "limit": limit}):
                (unreadable if task_problem(row) else due).append(row)
    # A job being verified again has no delivery leased meanwhile: its verification decides them anew.
    verifying = {row.job_id for row in due if row.kind == TaskKind.VERIFY}
    leasing = [row for row in due if row.kind == TaskKind.VERIFY or row.job_id not in verifying]
    claims = lease_tasks(conn, [row.id for row in leasing], worker_id, until, now)
    probing(conn, probes & {row.sink for row in leasing if row.kind == TaskKind.DELIVER}, until, now)
    found = list(claims.values())
    if (left := room.total - len(leasing) - len(unreadable)) > 0:
        # Rows never due (a bad run_after or status) are looked for only when there is room, so
        # that a busy queue does not pay for the search on every claim.
        unreadable += conn.execute(BROKEN[conn.dialect.name], {"limit": left, "now": now}).all()
    return found + lease_unreadable(conn, unreadable, set(claims), worker_id, until, now)


def lease_new_deliveries(
    conn: Connection,
    job_id: str,
    sinks: Sequence[str],
    lease: Collection[str] | None,
    worker_id: str,
    until: datetime,
    now: datetime,
    claimed: tuple[str, datetime],
) -> DeliveryClaim | None:
    """Make one delivery per sink due with a fresh budget (one statement); those of the sinks in
    ``lease`` (None: every sink) whose breaker is closed come back already leased to ``worker_id``,
    the others wait for a claim of their own lane.

    ``claimed`` is the job as its verify claim has it (detail, when received). A job being verified
    has delivered nowhere yet: only rejected jobs and jobs whose verification died are verified
    again. Should a delivery exist all the same, it is started over.
    """
    if not sinks:
        return None
    wanted = set(sinks if lease is None else lease) & set(sinks)
    closed = {sink for sink, breaker in read(conn, wanted).items() if breaker.admits(now) is None}
    row = {"job_id": job_id, "kind": TaskKind.DELIVER, "status": TaskStatus.PENDING, "run_after": now,
           "last_error": "", "updated_at": now, "done_at": None}  # fmt: skip
    held = {"attempts": 1, "locked_until": until, "locked_by": worker_id}
    waiting = {"attempts": 0, "locked_until": None, "locked_by": None}
    rows = [row | {"sink": sink} | (held if sink in closed else waiting) for sink in sinks]
    created = conn.execute(_LEASED_ANEW[conn.dialect.name], rows).all()
    leased = [r for r in created if r.locked_by is not None]
    if not leased:
        return None
    detail, received_at = claimed
    later = frozenset(r.sink for r in created if r.locked_by is None)
    return DeliveryClaim(detail, deliveries_of(job_id, leased), received_at, pending_elsewhere=later)
