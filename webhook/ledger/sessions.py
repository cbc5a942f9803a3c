"""The dashboard's logins, kept in the ledger so that every web process shares them.

Three things: the keys every process must agree on (the password's slow hash and the key that
signs cookies, made by the first process that needs them), the sessions (a random id per login,
stored only as its SHA-256, ended by logging out, by expiry, or by a new password), and the wrong
passwords per client address that make the next attempt wait. What the hashes and waits are is
the dashboard's business (:mod:`webhook.web.dashboard.auth`); this module only keeps them.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from webhook.ledger.errors import LedgerRefused, begin, connect
from webhook.ledger.schema import dashboard_keys, dashboard_logins, dashboard_sessions, utcnow

PASSWORD_KEY = "password"  # noqa: S105 (the name of the row that holds its hash)
COOKIE_KEY = "cookie"
# A client's wrong passwords are forgotten once it has made none for this long.
FORGET_FAILURES = timedelta(days=1)


class Standing(enum.StrEnum):
    """What a session id is worth now."""

    IN = "in"
    EXPIRED = "expired"  # it was a login, too long ago
    OUT = "out"  # never a login, logged out, or opened under another password


@dataclass(frozen=True)
class Failures:
    """A client address's wrong passwords since it last logged in (or was forgotten)."""

    count: int
    last_at: datetime


def _digest(session_id: str) -> str:
    # Stored hashed: whoever reads the ledger (a backup, a read-only role) gets no working cookie.
    return hashlib.sha256(session_id.encode()).hexdigest()


class Sessions:
    """The dashboard's keys, sessions and wrong logins (:attr:`Ledger.sessions`)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # -- keys ----------------------------------------------------------------------------------

    def key(self, name: str, make: Callable[[], str]) -> str:
        """The stored value of ``name``; the first caller stores ``make()``, and every caller, racing
        or not, gets the one value stored."""
        if (found := self._key(name)) is not None:
            return found
        try:
            with begin(self._engine) as conn:
                conn.execute(dashboard_keys.insert().values(name=name, value=make(), created_at=utcnow()))
        except LedgerRefused:
            pass  # another process stored it first: theirs is the one
        stored = self._key(name)
        assert stored is not None
        return stored

    def change_password(self, expected: str, password: str, cookie: str) -> bool:
        """Store ``password`` (a hash) and a new ``cookie`` key in place of ``expected``, and end every
        session, in one transaction; False (nothing changed) if the stored password is no longer ``expected``."""
        with begin(self._engine) as conn:
            changed = conn.execute(
                dashboard_keys.update()
                .where(dashboard_keys.c.name == PASSWORD_KEY, dashboard_keys.c.value == expected)
                .values(value=password, created_at=utcnow())
            ).rowcount
            if not changed:
                return False
            cookie_row = dashboard_keys.update().where(dashboard_keys.c.name == COOKIE_KEY)
            conn.execute(cookie_row.values(value=cookie, created_at=utcnow()))
            conn.execute(dashboard_sessions.delete())
        return True

    def _key(self, name: str) -> str | None:
        with connect(self._engine) as conn:
            found = conn.execute(sa.select(dashboard_keys.c.value).where(dashboard_keys.c.name == name)).scalar()
        return None if found is None else str(found)

    # -- sessions ------------------------------------------------------------------------------

    def open(self, session_id: str, password_id: str, lifetime: timedelta) -> None:
        """A session for ``session_id`` (random, from the caller), valid for ``lifetime``."""
        now = utcnow()
        row = {"digest": _digest(session_id), "password_id": password_id, "created_at": now}
        with begin(self._engine) as conn:
            conn.execute(dashboard_sessions.insert().values(**row, expires_at=now + lifetime))

    def standing(self, session_id: str, password_id: str) -> Standing:
        """Whether ``session_id`` is a login now, under the password ``password_id`` names."""
        query = sa.select(dashboard_sessions.c.password_id, dashboard_sessions.c.expires_at).where(
            dashboard_sessions.c.digest == _digest(session_id)
        )
        with connect(self._engine) as conn:
            row = conn.execute(query).first()
        if row is None or row.password_id != password_id:
            return Standing.OUT
        return Standing.IN if utcnow() < row.expires_at else Standing.EXPIRED

    def close(self, session_id: str) -> None:
        """End the session: its cookie is refused from now on, by every process."""
        with begin(self._engine) as conn:
            conn.execute(dashboard_sessions.delete().where(dashboard_sessions.c.digest == _digest(session_id)))

    # -- wrong logins --------------------------------------------------------------------------

    def failures(self, address: str) -> Failures | None:
        """The wrong passwords from ``address`` still remembered, or None."""
        query = sa.select(dashboard_logins.c.failures, dashboard_logins.c.last_failure_at).where(
            dashboard_logins.c.address == address, dashboard_logins.c.last_failure_at >= utcnow() - FORGET_FAILURES
        )
        with connect(self._engine) as conn:
            row = conn.execute(query).first()
        return None if row is None else Failures(int(row.failures), row.last_failure_at)

    def login_attempt(self, address: str) -> Failures:
        """Count an attempt from ``address`` as a wrong password, until :meth:`login_succeeded` forgets
        them (the first one after :data:`FORGET_FAILURES` counts as 1)."""
        now = utcnow()
        for _ in range(3):  # a row that appears (another process) between the update and the insert
            try:
                with begin(self._engine) as conn:
                    if (counted := self._count_failure(conn, address, now)) is not None:
                        return counted
                    conn.execute(dashboard_logins.insert().values(address=address, failures=1, last_failure_at=now))
                    return Failures(1, now)
            except LedgerRefused:
                continue
        raise LedgerRefused("IntegrityError", "dashboard_logins: the address's row kept changing")

    def _count_failure(self, conn: Connection, address: str, now: datetime) -> Failures | None:
        forgotten = dashboard_logins.c.last_failure_at < now - FORGET_FAILURES
        counted = sa.case((forgotten, 1), else_=dashboard_logins.c.failures + 1)
        updated = conn.execute(
            dashboard_logins.update()
            .where(dashboard_logins.c.address == address)
            .values(failures=counted, last_failure_at=now)
            .returning(dashboard_logins.c.failures)
        ).scalar()
        return None if updated is None else Failures(int(updated), now)

    def login_succeeded(self, address: str) -> None:
        """Forget the wrong passwords from ``address``."""
        with begin(self._engine) as conn:
            conn.execute(dashboard_logins.delete().where(dashboard_logins.c.address == address))

    # -- retention -----------------------------------------------------------------------------

    def prune(self, now: datetime | None = None) -> int:
        """Remove expired sessions and forgotten wrong logins; the number of rows removed."""
        now = now or utcnow()
        with begin(self._engine) as conn:
            sessions = conn.execute(dashboard_sessions.delete().where(dashboard_sessions.c.expires_at <= now)).rowcount
            logins = conn.execute(
                dashboard_logins.delete().where(dashboard_logins.c.last_failure_at < now - FORGET_FAILURES)
            ).rowcount
        return int(sessions) + int(logins)
