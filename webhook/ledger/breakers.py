"""A circuit breaker per sink, kept in the ledger so that every worker sees the same one.

A sink whose deliveries keep failing is *open* for a pause: its deliveries wait, due but not
leased, and spend no attempts. Then one delivery is leased as a probe (*probing*): a success
closes the breaker, a failure opens it for another pause. :class:`Breaker` decides (pure);
claims ask :func:`admitted` how many deliveries each sink may have leased, and workers report
each delivery's outcome to :meth:`Breakers.observe`.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from webhook.ledger.errors import begin, connect
from webhook.ledger.schema import breakers, utcnow


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


_READ = sa.select(breakers.c.sink, breakers.c.state, breakers.c.failures, breakers.c.until)


def read(conn: Connection, sinks: Collection[str] | None = None) -> dict[str, Breaker]:
    """The stored breakers (of ``sinks``, when named); a sink without a row is closed."""
    statement = _READ if sinks is None else _READ.where(breakers.c.sink.in_(list(sinks)))
    found = {row.sink: Breaker(row.sink, State(row.state), row.failures, row.until) for row in conn.execute(statement)}
    return found if sinks is None else {sink: found.get(sink, Breaker(sink)) for sink in sinks}


def admitted(conn: Connection, room: Mapping[str, int], now: datetime) -> tuple[dict[str, int], set[str]]:
    """How many deliveries of each sink may be leased, given its free slots (``room``) and its
    breaker; and which sinks' leases are probes (at most one each)."""
    allowed, probes = {}, set()
    for sink, breaker in read(conn, [sink for sink, free in room.items() if free > 0]).items():
        admits = breaker.admits(now)
        allowed[sink] = room[sink] if admits is None else admits
        if admits == 1:
            probes.add(sink)
    return allowed, probes


def probing(conn: Connection, sinks: Collection[str], until: datetime, now: datetime) -> None:
    """Probes of ``sinks`` were leased until ``until``: no other delivery of theirs is leased meanwhile."""
    for sink in sinks:
        _store(conn, sink, State.PROBING, until, now)


def _store(conn: Connection, sink: str, state: State, until: datetime | None, now: datetime, failures: int = 0) -> None:
    conn.execute(
        breakers.update()
        .where(breakers.c.sink == sink)
        .values(state=state, until=until, updated_at=now, **({"failures": failures} if state != State.PROBING else {}))
    )


_INSERT = {"postgresql": postgresql.insert(breakers), "sqlite": sqlite.insert(breakers)}


class Breakers:
    """Each sink's breaker: recording what became of a delivery, and reading them for operators."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def observe(self, sink: str, ok: bool, limit: int, pause: float) -> tuple[Breaker, Breaker]:
        """A delivery to ``sink`` succeeded or failed: the breaker before and after (see :meth:`Breaker.after`)."""
        now = utcnow()
        with begin(self._engine) as conn:
            new = {"sink": sink, "state": State.CLOSED, "failures": 0, "until": None, "updated_at": now}
            conn.execute(_INSERT[conn.dialect.name].values(new).on_conflict_do_nothing())
            row = conn.execute(_READ.where(breakers.c.sink == sink).with_for_update()).one()
            before = Breaker(sink, State(row.state), row.failures, row.until)
            after = before.after(ok, limit, pause, now)
            if after != before:
                _store(conn, sink, after.state, after.until, now, after.failures)
        return before, after

    def all(self) -> dict[str, Breaker]:
        """Every sink's breaker that has ever been other than closed, by sink."""
        with connect(self._engine) as conn:
            return read(conn)
