"""The callback endpoint on a real socket, for tests that post bodies and count what got stored."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests
import sqlalchemy as sa

from webhook.config import Settings
from webhook.ledger import Ledger
from webhook.ledger.schema import callbacks, jobs, tasks, versions
from webhook.web.app import create_app
from webhook.web.server import BackgroundServer

TOKEN = "cb-0123456789abcdef_ROTATE.1"
NOTHING = {"callbacks": 0, "jobs": 0, "job_versions": 0, "tasks": 0}


@contextmanager
def serving(ledger: Ledger, tokens: tuple[str, ...] = (TOKEN,), max_body_bytes: int = 1024 * 1024) -> Iterator[str]:
    settings = Settings(database_url=ledger.url, callback_tokens=tokens, max_body_bytes=max_body_bytes)
    with BackgroundServer(create_app(settings, ledger), name="endpoint") as server:
        yield server.url


def post(base: str, data: Any, content_type: str | None = None, token: str = TOKEN) -> requests.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return requests.post(f"{base}/callback/{token}", data=data, headers=headers, timeout=60)


def row_counts(ledger: Ledger) -> dict[str, int]:
    """Rows in each table a callback writes to."""
    with ledger.engine.connect() as conn:
        return {
            table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in (callbacks, jobs, versions, tasks)
        }
