"""A circuit breaker per sink, kept in the ledger so that every worker sees the same one.

A sink whose deliveries keep failing is *open* for a pause: its deliveries wait, due but not
leased, and spend no attempts. Then one delivery is leased as a probe (*probing*): a success
closes the breaker, a failure opens it for another pause. :class:`Breaker` decides (pure);
claims ask :func:`admitted` how many deliveries each sink may have leased, and each delivery's
outcome tells :func:`observe` how its sink did, in the transaction that records the outcome.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from webhook.ledger.errors import begin, connect
from webhook.ledger.schema import breakers as breakers_table
from webhook.ledger.schema import utcnow

log = logging.getLogger("webhook.worker")


class State(enum.StrEnum):
    CLOSED = "closed"  # deliveries are leased as slots allow
    OPEN = "open"  # paused until ``until``: nothing is leased
    PROBING = "probing"  # one delivery is out as a probe, its lease running out at ``until``


@dataclass(frozen=True)
class Breaker:
    """One sink's breaker: ``failures`` counts deliveries that failed since the last success."""

    sink: str
    state: State = State.CLOSED
    failures: int = 0
    until: datetime | None = None  # naive UTC; None when closed

    def admits(self, now: datetime) -> int | None:
        """How many deliveries may be leased now: None as many as slots allow, 1 a probe, 0 none.

        A probe whose lease ran out (its worker died) is replaced by another.
        """
        if self.state == State.CLOSED:
            return None
        return 0 if self.until is not None and self.until > now else 1

    def after(self, ok: bool, limit: int, pause: float, now: datetime) -> Breaker:
        """The breaker once a delivery succeeded (``ok``) or failed at ``now``: ``limit`` failures in
        a row (0: never) open it for ``pause`` seconds, and so does a failed probe."""
        if ok:
            return Breaker(self.sink)
        failures = self.failures + 1
        if self.state == State.OPEN:  # a delivery leased before the pause failed: the pause stands
            return replace(self, failures=failures)
        if self.state == State.PROBING or (limit and failures >= limit):
            return Breaker(self.sink, State.OPEN, failures, now + timedelta(seconds=pause))
        return replace(self, failures=failures)

    @property
    def troubled(self) -> bool:
        """Whether a success changes anything (a worker records one only then)."""
        return self != Breaker(self.sink)


_READ = sa.select(breakers_table.c.sink, breakers_table.c.state, breakers_table.c.failures, breakers_table.c.until)


def read(conn: Connection, sinks: Collection[str] | None = None) -> dict[str, Breaker]:
    """The stored breakers (of ``sinks``, when named); a sink without a row is closed."""
    statement = _READ if sinks is None else _READ.where(breakers_table.c.sink.in_(list(sinks)))
    found = {row.sink: _breaker(row) for row in conn.execute(statement)}
    return found if sinks is None else {sink: found.get(sink, Breaker(sink)) for sink in sinks}


def admitted(conn: Connection, room: Mapping[str, int], now: datetime) -> tuple[dict[str, int], set[str]]:
    """How many deliveries of each sink may be leased, given its free slots (``room``) and its
    breaker; and which sinks' leases are probes (at most one each).

    A sink due for a probe is read again with its row locked (on PostgreSQL; rows another claim
    holds are skipped): two workers claiming at once cannot both send a probe.
    """
    breakers = read(conn, [sink for sink, free in room.items() if free > 0])
    allowed = {sink: room[sink] if breaker.admits(now) is None else 0 for sink, breaker in breakers.items()}
    if candidates := [sink for sink, breaker in breakers.items() if breaker.admits(now) == 1]:
        locked = conn.execute(_READ.where(breakers_table.c.sink.in_(candidates)).with_for_update(skip_locked=True))
        probes = {row.sink for row in locked if _breaker(row).admits(now) == 1}
        allowed |= dict.fromkeys(probes, 1)
        return allowed, probes
    return allowed, set()


def _breaker(row: Any) -> Breaker:
    return Breaker(row.sink, State(row.state), row.failures, row.until)


def probing(conn: Connection, sinks: Collection[str], until: datetime, now: datetime) -> None:
    """Probes of ``sinks`` were leased until ``until``: no other delivery of theirs is leased meanwhile."""
    for sink in sinks:
        _store(conn, sink, State.PROBING, until, now)


def _store(conn: Connection, sink: str, state: State, until: datetime | None, now: datetime, failures: int = 0) -> None:
    conn.execute(
        breakers_table.update()
        .where(breakers_table.c.sink == sink)
        .values(state=state, until=until, updated_at=now, **({"failures": failures} if state != State.PROBING else {}))
    )


@dataclass(frozen=True)
class Health:
    """What a delivery's outcome says of its sink: it worked (``ok``) or failed; ``limit`` failures
    in a row (0: never) open its breaker for ``pause`` seconds."""

    sink: str
    ok: bool
    limit: int = 5
    pause: float = 30.0


_INSERT: dict[str, Any] = {"postgresql": postgresql.insert(breakers_table), "sqlite": sqlite.insert(breakers_table)}
_CLOSE = (
    breakers_table.update()
    .where(
        breakers_table.c.sink == sa.bindparam("sink_name"),
        sa.or_(breakers_table.c.state != State.CLOSED, breakers_table.c.failures > 0),
    )
    .values(state=State.CLOSED, failures=0, until=None, updated_at=sa.bindparam("now"))
)


def observe(conn: Connection, health: Health, now: datetime) -> None:
    """Move ``health.sink``'s breaker on (see :meth:`Breaker.after`). A success costs one statement
    that changes nothing while the breaker is closed and clean: deliveries that work stay cheap."""
    if health.ok:
        if conn.execute(_CLOSE, {"sink_name": health.sink, "now": now}).rowcount:
            log.info("sink %s works again: breaker closed", health.sink)
        return
    new = {"sink": health.sink, "state": State.CLOSED, "failures": 0, "until": None, "updated_at": now}
    conn.execute(_INSERT[conn.dialect.name].values(new).on_conflict_do_nothing())
    row = conn.execute(_READ.where(breakers_table.c.sink == health.sink).with_for_update()).one()
    before = _breaker(row)
    after = before.after(False, health.limit, health.pause, now)
    _store(conn, health.sink, after.state, after.until, now, after.failures)
    if after.state == State.OPEN and before.state != State.OPEN:
        log.warning(
            "sink %s paused for %gs after %d failed deliveries in a row: its deliveries wait",
            health.sink,
            health.pause,
            after.failures,
        )


class Breakers:
    """Each sink's breaker, as operators read it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def all(self) -> dict[str, Breaker]:
        """Every sink's breaker the ledger has a row for (see :meth:`ensure`), by sink."""
        with connect(self._engine) as conn:
            return read(conn)

    def ensure(self, sinks: Collection[str]) -> None:
        """A closed breaker for each of ``sinks`` that has none yet (a worker's at start), so that
        metrics, ``jobs sinks`` and the dashboard list every configured sink, failed or not."""
        now = utcnow()
        rows = [{"sink": s, "state": State.CLOSED, "failures": 0, "until": None, "updated_at": now} for s in sinks]
        if rows:
            with begin(self._engine) as conn:
                conn.execute(_INSERT[conn.dialect.name].values(rows).on_conflict_do_nothing())
