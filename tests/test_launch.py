"""Building the web app changes nothing; the launcher gunicorn and ``serve`` start prepares the ledger."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from webhook.config import Settings
from webhook.ledger import Ledger
from webhook.web.app import create_app
from webhook.web.launch import web_app


def test_building_the_app_touches_no_ledger_and_starts_nothing(tmp_path: Path) -> None:
    database = tmp_path / "ledger.db"
    settings = Settings(
        database_url=f"sqlite:///{database}", callback_tokens=("t" * 16,), auto_migrate=True, run_worker_in_web=True
    )
    ledger = Ledger(settings.database_url)
    threads = set(threading.enumerate())

    app = create_app(settings, ledger)

    assert app.test_client().get("/livez").status_code == 200
    assert not database.exists()  # SQLite creates the file at the first connection
    assert set(threading.enumerate()) == threads
    ledger.dispose()


def test_the_launcher_migrates_when_told_to(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'ledger.db'}", callback_tokens=("t" * 16,))
    ledger = Ledger(settings.database_url)

    web_app(settings.replace(auto_migrate=True), ledger)

    assert ledger.schema_problem() is None
    ledger.dispose()


def test_reading_the_configuration_loads_no_client_library() -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, webhook.config; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for library in ("qcloud_cos", "boto3", "redis", "pika", "sqlalchemy", "flask", "webhook.ci", "webhook.ledger"):
        assert f"'{library}'" not in loaded, library
