"""Named leases in the ledger: one process at a time does the work a lock names."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from webhook.ledger.errors import begin
from webhook.ledger.schema import locks, utcnow


class Locks:
    """``acquire`` wins a lock until it runs out; whoever holds it may renew it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._dialect = postgresql if engine.dialect.name == "postgresql" else sqlite

    def acquire(self, name: str, holder: str, seconds: float) -> bool:
        """Hold ``name`` for ``seconds`` unless another holder's lease on it is still running."""
        now = utcnow()
        until = now + timedelta(seconds=seconds)
        with begin(self._engine) as conn:
            taken = conn.execute(
                locks.update()
                .where(locks.c.name == name, sa.or_(locks.c.until < now, locks.c.holder == holder))
                .values(holder=holder, until=until)
            ).rowcount
            if taken:
                return True
            # First use of this name, or another holder's: two processes may get here together, the
            # primary key lets one win.
            first = self._dialect.insert(locks).values(name=name, holder=holder, until=until)
            return conn.execute(first.on_conflict_do_nothing().returning(locks.c.name)).first() is not None
