"""The ledger's engine, tuned per database: bounded waits on PostgreSQL; on SQLite, WAL and the
write lock taken up front (``BEGIN IMMEDIATE``), which is what makes claims exclusive there.
"""

from __future__ import annotations

import select
import sqlite3
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from webhook.ledger.errors import LedgerError

BUSY_TIMEOUT_MS = 30_000
# Connections kept open per process, opened only when used. Each claim a worker has in flight,
# its lease keeper, its heartbeat and its loop hold one at once; past the pool's size a checkout
# opens a new connection (a new backend on PostgreSQL) and closes it again after one transaction.
# Beyond it there is no cap: the process's threads bound how many are open at once.
POOL_SIZE = 20


def make_engine(url: str) -> Engine:
    """An engine tuned for the ledger's database: bounded waits, or SQLite's write lock up front."""
    return _postgres_engine(url) if not url.startswith("sqlite") else _sqlite_engine(url)


def read_only_engine(url: str) -> Engine:
    """An engine that reads the ledger at ``url`` and creates nothing there, not even a SQLite file:
    raises :class:`~webhook.ledger.errors.LedgerError` if that file does not exist."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return make_engine(url)
    path = Path(parsed.database).absolute()
    if not path.exists():
        raise LedgerError(f"sqlite database {path} does not exist (run cos-webhook migrate)")
    # ``mode=ro`` alone is not enough for the ledger's WAL database: when no process has it open (no
    # ``-wal`` or ``-shm`` file), a read-only connection creates both and, unable to checkpoint,
    # leaves them behind. Then every committed page is in the main file, so it is read as immutable,
    # which takes no locks and touches no other file. A database some process has open (or left
    # open when it was killed) is read through its WAL as usual.
    in_use = any(path.with_name(path.name + suffix).exists() for suffix in ("-wal", "-shm"))
    uri = f"{path.as_uri()}?mode=ro" + ("" if in_use else "&immutable=1")
    return sa.create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True, timeout=10), poolclass=NullPool)


def _postgres_engine(url: str) -> Engine:
    # Bounded waits: a database that stalls (network partition, overloaded server) must turn
    # into an error the caller answers (503, retry later), not a thread hung forever.
    engine = sa.create_engine(
        url,
        pool_size=POOL_SIZE,
        max_overflow=-1,
        connect_args={"connect_timeout": 5, "tcp_user_timeout": 30_000, "keepalives_idle": 30},
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cursor:
            cursor.execute("SET statement_timeout = '30s'")
        dbapi_conn.commit()

    @sa.event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        # Not a round trip (pool_pre_ping): an idle connection with something to read was closed by the
        # server (restart, terminated backend) or by something in between. The pool connects anew.
        idle = select.poll()
        idle.register(dbapi_conn.fileno(), select.POLLIN)
        if idle.poll(0):
            raise sa.exc.DisconnectionError("the database closed the connection while it was idle")

    return engine


def _sqlite_engine(url: str) -> Engine:
    path = url.split(":///", 1)[1] if ":///" in url else ""
    file_backed = bool(path) and path != ":memory:"
    if file_backed:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    connection_class = _writer_connection(threading.Lock())
    engine = sa.create_engine(
        url,
        pool_size=POOL_SIZE,
        max_overflow=-1,
        connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False, "factory": connection_class},
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin (see below).
        dbapi_conn.isolation_level = None
        dbapi_conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        dbapi_conn.execute("PRAGMA foreign_keys=ON")
        if file_backed:
            _use_wal(dbapi_conn)

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Take the write lock up front: two workers can then never claim the same task.
        conn.connection.driver_connection.begin_immediate()  # type: ignore[union-attr]

    return engine


def _writer_connection(writer: threading.Lock) -> type[sqlite3.Connection]:
    """A connection class whose transactions take ``writer`` (one per engine) before SQLite's lock.

    The threads of one process then queue on a lock that wakes the next one as soon as it is
    free, instead of each polling SQLite's: its busy handler sleeps 1, 2, 5, 10 … ms between
    tries, far longer than a writer holds the lock, and polling it faster costs every waiter CPU.
    Only one thread per process then contends with other processes, briskly (see below).
    """

    class WriterConnection(sqlite3.Connection):
        holding = False

        def begin_immediate(self) -> None:
            if not writer.acquire(timeout=BUSY_TIMEOUT_MS / 1000):
                raise sqlite3.OperationalError("database is locked (by another thread of this process)")
            self.holding = True
            try:
                self._begin_immediate()
            except BaseException:
                self._release()
                raise

        def _begin_immediate(self) -> None:
            # Another process holds the lock at most for one short transaction: try every 0.1 ms
            # for about 0.1 s, then leave it to the busy handler and its timeout.
            self.execute("PRAGMA busy_timeout=0")
            try:
                for _ in range(1000):
                    with suppress(sqlite3.OperationalError):
                        self.execute("BEGIN IMMEDIATE")
                        return
                    time.sleep(0.0001)
            finally:
                self.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self.execute("BEGIN IMMEDIATE")

        def commit(self) -> None:
            try:
                super().commit()
            finally:
                self._release()

        def rollback(self) -> None:
            try:
                super().rollback()
            finally:
                self._release()

        def close(self) -> None:
            try:
                super().close()
            finally:
                self._release()

        def _release(self) -> None:
            if self.holding:
                self.holding = False
                writer.release()

    return WriterConnection


def _use_wal(dbapi_conn: Any) -> None:
    """WAL lets readers run beside the writer. Switching needs an exclusive lock and does not
    wait on the busy handler, so processes opening a new database together retry here."""
    for _ in range(200):
        try:
            if dbapi_conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal":
                return
        except sqlite3.OperationalError:
            pass
        time.sleep(0.05)
    raise sqlite3.OperationalError("could not switch the SQLite ledger to WAL mode")
