"""The ledger's tables and its engine: one SQLAlchemy Core schema for SQLite and PostgreSQL.

The tables here are the head of the migrations (``migrations/versions``): change one only
together with a new revision, which ``tests/test_migrations.py`` checks.

Times are naive UTC (:func:`utcnow`), the one representation both databases compare
correctly. On PostgreSQL every wait is bounded; on SQLite every write transaction takes the
write lock up front (``BEGIN IMMEDIATE``), which is what makes claims exclusive there.
"""

from __future__ import annotations

import select
import sqlite3
import time
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

metadata = sa.MetaData()

callbacks = sa.Table(
    "callbacks",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("received_at", sa.DateTime, nullable=False),
    sa.Column("remote_addr", sa.String(64), nullable=False),
    sa.Column("content_type", sa.String(256), nullable=False),
    sa.Column("headers", sa.Text, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("body_format", sa.String(8), nullable=False),
    sa.Column("event_name", sa.String(64), nullable=False),
    # A body seen before is not stored twice: ``body`` is empty and ``body_of`` names the callback
    # that has it (no foreign key: that one may be pruned first, and this one keeps its metadata).
    sa.Column("sha256", sa.String(64), nullable=True),  # NULL for callbacks stored before this
    sa.Column("size", sa.Integer, nullable=True),
    sa.Column("body_of", sa.Integer, nullable=True),
    sa.Index("ix_callbacks_sha256", "sha256"),
    sa.Index("ix_callbacks_received", "received_at"),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("job_id", sa.String(128), primary_key=True),
    sa.Column("callback_id", sa.Integer, sa.ForeignKey("callbacks.id"), nullable=False),
    sa.Column("event_name", sa.String(64), nullable=False),
    sa.Column("tag", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.Index("ix_jobs_status", "status", "updated_at"),  # counts per status; retention's finished jobs
)

# What each callback said about a job. A job is verified against CI once per distinct version,
# so a forged callback that arrives first cannot shadow the genuine one.
versions = sa.Table(
    "job_versions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(128), sa.ForeignKey("jobs.job_id"), nullable=False),
    sa.Column("callback_id", sa.Integer, sa.ForeignKey("callbacks.id"), nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),  # sha256 of detail
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # VersionStatus
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("received_at", sa.DateTime, nullable=False),
    sa.UniqueConstraint("job_id", "digest"),
)

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(128), sa.ForeignKey("jobs.job_id"), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("sink", sa.String(64), nullable=False),  # JOB_WIDE for a verify task
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("run_after", sa.DateTime, nullable=False),
    sa.Column("locked_until", sa.DateTime, nullable=True),
    sa.Column("locked_by", sa.String(128), nullable=True),
    sa.Column("last_error", sa.Text, nullable=False, default=""),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.Column("done_at", sa.DateTime, nullable=True),
    sa.UniqueConstraint("job_id", "kind", "sink"),
    sa.Index("ix_tasks_due", "status", "run_after"),
    sa.Index("ix_tasks_groups", "status", "kind", "sink", "run_after"),  # metrics per (kind, sink)
)
# Every attempt at a step (verify, fetch, one sink's delivery), for the job's timeline. Replay
# adds attempts; none is ever erased.
attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(128), sa.ForeignKey("jobs.job_id"), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),  # verify, fetch, deliver
    sa.Column("sink", sa.String(64), nullable=False),  # JOB_WIDE for verify and fetch
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("duration_ms", sa.Integer, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),  # AttemptOutcome
    sa.Column("code", sa.String(64), nullable=False),  # HTTP status or error code, "" if none
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("worker_id", sa.String(128), nullable=False),
    sa.Index("ix_attempts_job", "job_id", "id"),
)

# Live workers: each renews its row every WEBHOOK_HEARTBEAT_SECONDS. Leases held by a worker
# whose row is stale (or gone) are taken over without waiting for them to run out.
workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("heartbeat_at", sa.DateTime, nullable=False),
)

# Named leases for work that one process at a time should do (a worker's periodic reconcile).
locks = sa.Table(
    "locks",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(128), nullable=False),
    sa.Column("until", sa.DateTime, nullable=False),
)

# The sink column of a task that belongs to the job (verification), not to one sink. Kept out of
# the ledger's interface: a verify Task has no sink. (NULL would need a schema migration.)
JOB_WIDE = ""


class LedgerError(Exception):
    """A ledger operation that cannot be carried out as asked (unknown job, bad replay)."""


def utcnow() -> datetime:
    """Naive UTC: one representation that both SQLite and PostgreSQL compare correctly."""
    return datetime.now(UTC).replace(tzinfo=None)


def make_engine(url: str) -> Engine:
    """An engine tuned for the ledger's database: bounded waits, or SQLite's write lock up front."""
    return _postgres_engine(url) if not url.startswith("sqlite") else _sqlite_engine(url)


def _postgres_engine(url: str) -> Engine:
    # Bounded waits: a database that stalls (network partition, overloaded server) must turn
    # into an error the caller answers (503, retry later), not a thread hung forever.
    engine = sa.create_engine(
        url,
        pool_timeout=10,
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
    busy_timeout_ms = 30_000
    engine = sa.create_engine(url, connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin (see below).
        dbapi_conn.isolation_level = None
        dbapi_conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        dbapi_conn.execute("PRAGMA foreign_keys=ON")
        if file_backed:
            _use_wal(dbapi_conn)

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Take the write lock up front: two workers can then never claim the same task. SQLite's busy handler
        # sleeps 1, 2, 5, 10 … ms between tries, far longer than a writer holds the lock (and the holder, free
        # first, took it again): the first ~0.1 s of a wait try every 0.1 ms instead.
        dbapi_conn: Any = conn.connection.driver_connection
        dbapi_conn.execute("PRAGMA busy_timeout=0")
        try:
            for _ in range(1000):
                with suppress(sqlite3.OperationalError):
                    dbapi_conn.execute("BEGIN IMMEDIATE")
                    return
                time.sleep(0.0001)
        finally:
            dbapi_conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # raises as SQLAlchemy does, or waits on the busy handler

    return engine


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


# Queue messages (TDMQ) that are not a callback cos-webhook can read, kept as they arrived with the
# reason, so the queue can move on without losing them; re-parsed after a fix. A message handed
# over again (its delete was lost) is the same row: ``queue`` and ``msg_id`` name it.
messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("queue", sa.String(128), nullable=False),
    sa.Column("msg_id", sa.String(128), nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),  # msgBody as received, UTF-8
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # quarantined, or recorded once re-parsed
    sa.Column("deliveries", sa.Integer, nullable=False),  # how often the queue handed it over
    sa.Column("callback_id", sa.Integer, nullable=True),  # the callback it became; no foreign key: pruning
    sa.Column("received_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.UniqueConstraint("queue", "msg_id"),
    sa.Index("ix_messages_status", "status", "received_at"),
)
