"""Fixtures: ledgers on SQLite and PostgreSQL, the sandbox, an http sink's far end, a whole pipeline.

Also the hypothesis profiles. Plain helpers (services, servers, sample data) are in ``support``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
from support.ledgers import SchemaPool, SqliteTemplate
from support.pipeline import Pipeline, pipeline_settings
from support.receiver import Receiver
from support.services import IN_CI, postgres_schema

from webhook.dev.sandbox import Sandbox
from webhook.ledger import Ledger
from webhook.web.app import create_app
from webhook.web.server import BackgroundServer

# Hypothesis examples per property test: "ci" (CI=true) runs today's full 12,000; "dev" is a quick inner loop.
hypothesis.settings.register_profile("ci", max_examples=2_000)
hypothesis.settings.register_profile("dev", max_examples=200)
hypothesis.settings.load_profile("ci" if IN_CI else "dev")


# Tests that migrate their ledger anyway get one migrated already (support.ledgers).
MIGRATING = frozenset({"ledger", "pipeline"})


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> SqliteTemplate:
    return SqliteTemplate(tmp_path_factory.mktemp("ledger-template"))


@pytest.fixture(scope="session")
def schema_pool() -> Iterator[SchemaPool]:
    pool = SchemaPool()
    yield pool
    pool.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh ledger database, a SQLite file or a private PostgreSQL schema: empty, or migrated
    and empty for a test that uses the ``ledger`` or ``pipeline`` fixture (which migrate it)."""
    migrated = not MIGRATING.isdisjoint(request.fixturenames)
    if request.param == "sqlite":
        path = tmp_path / "ledger.db"
        if migrated:
            request.getfixturevalue("sqlite_template").copy_to(path)
        yield f"sqlite:///{path}"
        return
    if migrated:
        with request.getfixturevalue("schema_pool").schema() as url:
            yield url
        return
    with postgres_schema() as url:
        yield url


@pytest.fixture
def ledger(database_url: str) -> Iterator[Ledger]:
    ledger = Ledger(database_url)
    ledger.migrate()
    yield ledger
    ledger.dispose()


@pytest.fixture
def sandbox(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sandbox]:
    """The local COS/CI; parametrize indirectly with a number to delay every job that long."""
    with Sandbox(tmp_path / "sandbox", job_delay=getattr(request, "param", 0.0)).start() as running:
        yield running


@pytest.fixture
def http_sink() -> Iterator[Receiver]:
    """The http sink's far end: records requests, answers 200 unless told otherwise."""
    with Receiver() as running:
        yield running


@pytest.fixture
def pipeline(database_url: str, sandbox: Sandbox, http_sink: Receiver, tmp_path: Path) -> Iterator[Pipeline]:
    settings = pipeline_settings(database_url, sandbox, tmp_path / "delivered", http_sink.url + "hooks")
    ledger = Ledger(database_url)
    ledger.migrate()
    with BackgroundServer(create_app(settings, ledger), name="receiver") as server:
        yield Pipeline(settings, ledger, sandbox, server.url, http_sink, tmp_path / "delivered")
    ledger.dispose()
