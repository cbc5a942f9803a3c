"""Named leases in the ledger: one process at a time does the work a lock names."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from webhook.ledger.schema import locks, utcnow


class Locks:
    """``acquire`` wins a lock until it runs out; whoever holds it may renew it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def acquire(self, name: str, holder: str, seconds: float) -> bool:
        """Hold ``name`` for ``seconds`` unless another holder's lease on it is still running."""
        try:
            return self._acquire(name, holder, seconds)
        except sa.exc.IntegrityError:  # another process inserted the lock first
            return False

    def _acquire(self, name: str, holder: str, seconds: float) -> bool:
        now = utcnow()
        until = now + timedelta(seconds=seconds)
        with self._engine.begin() as conn:
            taken = conn.execute(
                locks.update()
                .where(locks.c.name == name, sa.or_(locks.c.until < now, locks.c.holder == holder))
                .values(holder=holder, until=until)
            ).rowcount
            if taken:
                return True
            if conn.execute(sa.select(locks.c.name).where(locks.c.name == name)).first() is not None:
                return False
            # First use of this name: two processes may get here together, the primary key lets one win.
            conn.execute(locks.insert().values(name=name, holder=holder, until=until))
            return True

    def release(self, name: str, holder: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(locks.delete().where(locks.c.name == name, locks.c.holder == holder))
