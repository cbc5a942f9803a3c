"""Migrated, empty ledgers handed out ready, for tests that would migrate a new one anyway.

Migrating costs a test far more than its own work (PostgreSQL's DDL, each table and index): a
SQLite ledger is copied from one migrated at the start of the session, and PostgreSQL schemas,
once migrated, are emptied after each test (rows deleted, sequences restarted) and handed to the
next. A schema a test changed (a table dropped to break the ledger, a column altered, a revision
undone) is dropped instead: the next test gets a new one. What a test sees is what migrating a new
database gives: the same tables, no rows, ids from 1.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from support.services import POSTGRES_URL, require_service, schema_url
from webhook.ledger import Ledger
from webhook.ledger.schema import metadata

# What a schema is made of, as PostgreSQL lists it (without its name): a test that changed any of
# it gave its schema up.
_SHAPE = sa.text(
    "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns"
    " WHERE table_schema = current_schema()"
    " UNION ALL SELECT tablename, indexname, '', '', '' FROM pg_indexes WHERE schemaname = current_schema()"
    " UNION ALL SELECT 'alembic_version', version_num, '', '', '' FROM alembic_version"
    " ORDER BY 1, 2"
)
_SEQUENCES = sa.text("SELECT sequence_name FROM information_schema.sequences WHERE sequence_schema = current_schema()")


class SqliteTemplate:
    """A SQLite ledger migrated once, copied for each test that needs a migrated one."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "migrated.db"
        ledger = Ledger(f"sqlite:///{self.path}")
        ledger.migrate()
        ledger.dispose()
        assert not Path(f"{self.path}-wal").exists(), "the template's WAL was not checkpointed on closing"

    def copy_to(self, path: Path) -> None:
        shutil.copyfile(self.path, path)


class SchemaPool:
    """Migrated PostgreSQL schemas for the session, each used by one test at a time.

    It holds no connection between tests: the database's connections are shared with whatever
    else runs on the machine.
    """

    def __init__(self) -> None:
        self._free: list[str] = []  # emptied schemas
        self._made: list[str] = []  # every schema made and not yet dropped
        self._shape: list[tuple[object, ...]] | None = None  # a newly migrated schema's

    @contextmanager
    def schema(self) -> Iterator[str]:
        """The URL of a migrated, empty schema for the time of a test."""
        schema = self._free.pop() if self._free else self._new()
        yield schema_url(schema)
        if self._emptied(schema):
            self._free.append(schema)
        else:
            self._drop(schema)

    def close(self) -> None:
        for schema in list(self._made):
            self._drop(schema)

    def _new(self) -> str:
        require_service("PostgreSQL", "127.0.0.1", 5432)
        schema = f"pool_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE SCHEMA "{schema}"')
        self._made.append(schema)
        ledger = Ledger(schema_url(schema))
        try:
            ledger.migrate()
            if self._shape is None:
                with ledger.engine.connect() as conn:
                    self._shape = [tuple(row) for row in conn.execute(_SHAPE)]
        finally:
            ledger.dispose()
        return schema

    def _emptied(self, schema: str) -> bool:
        """Whether the schema is as migrating made it, now emptied; if not, no test gets it again."""
        engine = sa.create_engine(schema_url(schema), poolclass=sa.NullPool)
        try:
            with engine.begin() as conn:
                # A connection the test left holding a lock must not hang the session: give the schema up.
                conn.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
                if [tuple(row) for row in conn.execute(_SHAPE)] != self._shape:
                    return False
                for table in reversed(metadata.sorted_tables):  # rows that others point at last
                    conn.execute(table.delete())
                for sequence in conn.execute(_SEQUENCES).scalars().all():
                    conn.execute(sa.text("SELECT setval(:sequence, 1, false)"), {"sequence": sequence})
            return True
        except sa.exc.DBAPIError:
            return False
        finally:
            engine.dispose()

    def _drop(self, schema: str) -> None:
        self._made.remove(schema)
        self._admin(f'DROP SCHEMA "{schema}" CASCADE')

    @staticmethod
    def _admin(statement: str) -> None:
        engine = sa.create_engine(POSTGRES_URL, poolclass=sa.NullPool)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(statement))
        finally:
            engine.dispose()
