"""Shared fixtures: ledgers on SQLite and PostgreSQL, and a helper to demand real services.

A test that needs a service fails when ``CI=true`` and the service is missing, and skips
with the reason everywhere else.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import pytest
import sqlalchemy as sa
from flask import Flask
from pipeline import Pipeline, pipeline_settings
from receiver import Receiver
from werkzeug.serving import make_server

from webhook.app import create_app
from webhook.ledger import Ledger
from webhook.sandbox import Sandbox

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def require_service(name: str, host: str, port: int) -> None:
    """Skip (or, in CI, fail) unless something listens on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as exc:
        unavailable(f"{name} is not reachable on {host}:{port} ({exc})")


def unavailable(message: str) -> NoReturn:
    """Something a test needs is missing: fail when ``CI=true``, skip with the reason elsewhere."""
    if IN_CI:
        pytest.fail(f"{message}; CI=true requires it")
    pytest.skip(message)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty ledger database: a SQLite file, or a private PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    with postgres_schema() as url:
        yield url


@contextmanager
def postgres_schema(prefix: str = "t") -> Iterator[str]:
    """The URL of a new, empty PostgreSQL schema, dropped afterwards (skip, or fail in CI, without one)."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def ledger(database_url: str) -> Iterator[Ledger]:
    ledger = Ledger(database_url)
    ledger.create_schema()
    yield ledger
    ledger.dispose()


class LiveServer:
    """A WSGI app served on a real socket in a background thread."""

    def __init__(self, app: Flask) -> None:
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> LiveServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._thread.join()


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
    with LiveServer(create_app(settings, ledger)) as server:
        yield Pipeline(settings, ledger, sandbox, server.url, http_sink, tmp_path / "delivered")
    ledger.dispose()
