"""Is the ledger ready for work: does it answer within a bound, and is its schema this version's?"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from webhook.ledger.errors import LedgerUnavailable, connect
from webhook.ledger.migrate import schema_problem


class Readiness:
    """The check, on a connection of its own (not the pool's, which callbacks may hold), answered
    within ``timeout`` seconds. One check runs at a time; callers during it share it."""

    def __init__(self, url: URL, timeout: float) -> None:
        self._timeout = timeout
        self._postgres = url.get_backend_name() == "postgresql"
        # libpq waits at least 2 s to connect; the answer is still given after the timeout.
        args = {"connect_timeout": 2} if self._postgres else {"timeout": timeout, "check_same_thread": False}
        self._engine = sa.create_engine(url, poolclass=NullPool, connect_args=args)
        self._lock = threading.Lock()
        self._running: Future[str | None] | None = None

    def problem(self) -> str | None:
        """Why the ledger is not ready (unreachable, too slow, schema not current), or None."""
        with self._lock:
            if self._running is None or self._running.done():
                self._running = Future()
                threading.Thread(target=self._check, args=(self._running,), name="readyz", daemon=True).start()
            running = self._running
        try:
            return running.result(timeout=self._timeout)
        except TimeoutError:
            return f"the ledger did not answer within {self._timeout:g} s"

    def _check(self, result: Future[str | None]) -> None:
        try:
            with connect(self._engine) as conn:
                if self._postgres:
                    conn.execute(sa.text(f"SET LOCAL statement_timeout = {round(self._timeout * 1000)}"))
                conn.execute(sa.text("SELECT 1"))
            result.set_result(schema_problem(self._engine))
        except Exception as exc:  # whatever it is, the answer is "not ready", with its kind
            kind = exc.kind if isinstance(exc, LedgerUnavailable) else type(exc).__name__
            result.set_result(f"the ledger is unreachable ({kind})")
