"""The ledger's tables and its engine: one SQLAlchemy Core schema for SQLite and PostgreSQL.

The tables here are the head of the migrations (``migrations/versions``): change one only
together with a new revision, which ``tests/test_migrations.py`` checks.

Times are naive UTC (:func:`utcnow`), the one representation both databases compare
correctly. The engines for each database are in :mod:`webhook.ledger.engine`.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

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

# Each sink's circuit breaker, shared by the workers (:mod:`webhook.ledger.breakers`); a sink
# without a row is closed, as every sink is until its deliveries fail.
breakers = sa.Table(
    "sink_breakers",
    metadata,
    sa.Column("sink", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),  # closed, open, probing
    sa.Column("failures", sa.Integer, nullable=False),  # deliveries failed since the last success
    sa.Column("until", sa.DateTime, nullable=True),  # open: paused until; probing: the probe's lease ends
    sa.Column("updated_at", sa.DateTime, nullable=False),
)

# The sink column of a task that belongs to the job (verification), not to one sink. Kept out of
# the ledger's interface: a verify Task has no sink. (NULL would need a schema migration.)
JOB_WIDE = ""


def utcnow() -> datetime:
    """Naive UTC: one representation that both SQLite and PostgreSQL compare correctly."""
    return datetime.now(UTC).replace(tzinfo=None)


def utc_text(when: datetime) -> str:
    """``when`` (naive UTC, or aware) as every command prints a time: UTC, to the second, marked
    ``Z`` (``2026-12-07T04:05:06Z``), so an operator never has to guess which zone a line speaks."""
    aware = when if when.tzinfo else when.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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

# The dashboard's logins (webhook.ledger.sessions). A session is known by the SHA-256 of the random id
# its cookie carries, so reading the ledger gives no cookie that works; ``password_id`` names the
# password it was opened under, and a new password ends it.
dashboard_sessions = sa.Table(
    "dashboard_sessions",
    metadata,
    sa.Column("digest", sa.String(64), primary_key=True),
    sa.Column("password_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("expires_at", sa.DateTime, nullable=False),
    sa.Index("ix_dashboard_sessions_expires", "expires_at"),
)

# What every web process must sign and check alike: the password's slow hash (``password``) and
# the key that signs the dashboard's cookies (``cookie``), both made by the first process to need them.
dashboard_keys = sa.Table(
    "dashboard_keys",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
)

# Wrong dashboard passwords per client address, for the growing wait between attempts.
dashboard_logins = sa.Table(
    "dashboard_logins",
    metadata,
    sa.Column("address", sa.String(64), primary_key=True),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("last_failure_at", sa.DateTime, nullable=False),
)
