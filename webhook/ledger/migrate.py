"""Schema migrations: bring a ledger to the head revision, or say how far behind it is.

A ledger made before migrations existed (``create_all`` of the baseline tables, no
``alembic_version``) is adopted: stamped at the baseline, then upgraded like any other.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from webhook.ledger.errors import connect
from webhook.ledger.schema import metadata

BASELINE = "0001"
_MIGRATIONS = Path(__file__).with_name("migrations")
_PG_LOCK = 7305513  # serializes processes that migrate at the same start-up

log = logging.getLogger(__name__)
# Alembic narrates every context it opens; a process checking its schema at start-up needs none of it.
# Our processes' logging set-up holds it back too (webhook.telemetry.logs.QUIET), before alembic's
# import narrates; this covers hosts that configure logging themselves.
logging.getLogger("alembic").setLevel(logging.WARNING)


def _config(conn: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["connection"] = conn
    return config


@functools.cache
def _scripts() -> ScriptDirectory:
    # Parsed once per process: readiness probes ask for the head on every call.
    return ScriptDirectory.from_config(_config())


def head() -> str:
    """The revision this version of cos-webhook needs."""
    revision = _scripts().get_current_head()
    assert revision is not None
    return revision


def current(conn: Connection) -> str | None:
    """The ledger's revision; None when it has none (empty, or made before migrations)."""
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, target: str = "head") -> None:
    """Migrate to ``target``: safe when several processes do it at once, and on a ledger with rows."""
    with connect(engine) as conn:
        if engine.dialect.name == "sqlite":
            # Rebuilding a table (SQLite's way to alter one) must not trip the foreign keys of rows
            # pointing at it. The pragma only takes effect outside a transaction: set it on the
            # driver's connection before SQLAlchemy begins one.
            conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
        try:
            with conn.begin():
                if engine.dialect.name == "postgresql":
                    conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({_PG_LOCK})"))
                config = _config(conn)
                before = current(conn)
                if before is None and sa.inspect(conn).has_table("callbacks"):
                    log.info("adopting a ledger made before migrations at revision %s", BASELINE)
                    command.stamp(config, BASELINE)
                command.upgrade(config, target)
                if (after := current(conn)) != before:
                    log.info("migrated the ledger from revision %s to %s", before or "(none)", after)
        finally:
            if engine.dialect.name == "sqlite":
                conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")  # type: ignore[union-attr]


def schema_problem(engine: Engine) -> str | None:
    """Why processes must not use this ledger as it is, or None when its schema is current (read only).

    The one schema check: processes starting, ``cos-webhook check`` and the readiness probe all ask it.
    """
    with connect(engine) as conn:
        revision = current(conn)
        tables = set(sa.inspect(conn).get_table_names())
    wanted = head()
    if revision == wanted:
        missing = sorted(set(metadata.tables) - tables)
        return f"the ledger lacks tables {', '.join(missing)} (run cos-webhook migrate)" if missing else None
    if revision is None:
        found = "was made before migrations" if "callbacks" in tables else "has no tables"
        return f"the ledger {found}: run cos-webhook migrate"
    if revision not in {script.revision for script in _scripts().walk_revisions()}:
        return f"the ledger is at revision {revision}, newer than this version of cos-webhook knows ({wanted})"
    return f"the ledger is at revision {revision}, this version needs {wanted}: run cos-webhook migrate"
