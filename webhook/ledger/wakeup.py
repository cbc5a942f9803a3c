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

CHANNEL = "cos_webhook_work"
SQLITE_CHECK_SECONDS = 0.02


def notify(conn: Connection) -> None:
    """Tell listening workers that work is due once ``conn``'s transaction commits."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"NOTIFY {CHANNEL}")


class Wakeup:
    """An event set when the ledger may hold new work; a background thread watches the database."""

    def __init__(self, engine: Engine) -> None:
        self.event = threading.Event()
        self._engine = engine
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        url = self._engine.url
        if url.get_backend_name() == "postgresql":
            target: Any = self._listen
        elif url.database and url.database != ":memory:":
            target = self._watch_file
        else:
            return  # an in-memory database has no other writers to notice
        self._thread = threading.Thread(target=target, name="wakeup", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a wake-up; True if one came. Clears it either way."""
        woken = self.event.wait(timeout)
        self.event.clear()
        return woken

    def _listen(self) -> None:
        conninfo = self._engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while not self._stop.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
                    self.event.set()  # anything committed while we were not listening
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=1):
                            self.event.set()
            except psycopg.Error as exc:
                log.warning("cannot listen for new work (%s); polling until it can", type(exc).__name__)
                self._stop.wait(5)

    def _watch_file(self) -> None:
        database = self._engine.url.database
        assert database is not None
        seen: int | None = None
        while not self._stop.wait(SQLITE_CHECK_SECONDS):
            try:
                with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1)) as conn:
                    while not self._stop.wait(SQLITE_CHECK_SECONDS):
                        version = conn.execute("PRAGMA data_version").fetchone()[0]
                        if version != seen:
                            seen = version
                            self.event.set()
            except sqlite3.Error as exc:
                log.warning("cannot watch the ledger file (%s); polling until it can", exc)
                self._stop.wait(5)
