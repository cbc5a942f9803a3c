"""Waking idle workers when work arrives, instead of leaving it until their next poll.

PostgreSQL: a transaction that makes work due sends ``NOTIFY`` (delivered on commit, dropped
on rollback); each worker listens on a connection of its own. SQLite has no notifications
between processes, but ``PRAGMA data_version`` changes whenever another connection commits and
reading it takes no lock, so a worker reads it every few milliseconds instead. Either way the
poll interval stays as the upper bound: a missed wake-up costs latency, never work.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from contextlib import closing
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger("webhook.worker")

# One channel per schema (``cos_webhook_work:<schema>``): ledgers kept in several schemas of one
# database (deployments, test runs) do not wake each other's workers.
CHANNEL = "cos_webhook_work"
SQLITE_CHECK_SECONDS = 0.02


def notify(conn: Connection) -> None:
    """Tell listening workers that work is due once ``conn``'s transaction commits."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_notify('{CHANNEL}:' || current_schema(), '')")


def listen(conn: psycopg.Connection[Any]) -> str:
    """LISTEN on the channel of ``conn``'s schema (where :func:`notify` sends); returns its name."""
    row = conn.execute("SELECT current_schema()").fetchone()
    channel = f"{CHANNEL}:{row[0] if row else 'public'}"
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    return channel


class Wakeup:
    """An event set when the ledger may hold new work; as a worker's service, it watches the database."""

    name = "wakeup"

    def __init__(self, engine: Engine) -> None:
        self.event = threading.Event()
        self._engine = engine

    def run(self, stopping: threading.Event) -> None:
        """Watch until ``stopping`` is set."""
        url = self._engine.url
        if url.get_backend_name() == "postgresql":
            self._listen(stopping)
        elif url.database and url.database != ":memory:":
            self._watch_file(stopping)
        else:
            stopping.wait()  # an in-memory database has no other writers to notice

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a wake-up; True if one came. Clears it either way."""
        woken = self.event.wait(timeout)
        self.event.clear()
        return woken

    def _listen(self, stopping: threading.Event) -> None:
        conninfo = self._engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while not stopping.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
                    listen(conn)
                    self.event.set()  # anything committed while we were not listening
                    while not stopping.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=1):
                            self.event.set()
            except psycopg.Error as exc:
                log.warning("cannot listen for new work (%s); polling until it can", type(exc).__name__)
                stopping.wait(5)

    def _watch_file(self, stopping: threading.Event) -> None:
        database = self._engine.url.database
        assert database is not None
        seen: int | None = None
        while not stopping.wait(SQLITE_CHECK_SECONDS):
            try:
                with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1)) as conn:
                    while not stopping.wait(SQLITE_CHECK_SECONDS):
                        version = conn.execute("PRAGMA data_version").fetchone()[0]
                        if version != seen:
                            seen = version
                            self.event.set()
            except sqlite3.Error as exc:
                log.warning("cannot watch the ledger file (%s); polling until it can", exc)
                stopping.wait(5)
