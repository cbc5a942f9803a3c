"""How a web process starts: gunicorn (``webhook.web.launch:web_app()``, see the Procfile) and
``cos-webhook serve`` both begin here.

:func:`web_app` reads the settings, sets up logging, prepares the ledger (migrates it with
``WEBHOOK_AUTO_MIGRATE``, else refuses one whose schema is behind), builds the app and, with
``WEBHOOK_RUN_WORKER``, starts a worker beside the web handlers (single-process deploys).
"""

from __future__ import annotations

import threading

from flask import Flask

from webhook.config import Settings
from webhook.ledger import Ledger
from webhook.telemetry.logs import setup_logging
from webhook.web.app import create_app


def web_app(settings: Settings | None = None, ledger: Ledger | None = None) -> Flask:
    """The app of one web process, ready to serve; settings from the environment unless given."""
    settings = settings or Settings.from_env()
    setup_logging(settings.log_level, settings.log_format)
    ledger = ledger or Ledger(settings.database_url)
    app = create_app(settings, ledger)
    ledger.prepare(settings.auto_migrate)
    if settings.run_worker_in_web:
        _start_worker_thread(settings, ledger)
    return app


def _start_worker_thread(settings: Settings, ledger: Ledger) -> None:
    """Single-process deploys: run a worker beside the web handlers."""
    from webhook.worker.runtime import Worker

    worker = Worker.from_settings(settings, ledger)
    threading.Thread(target=worker.run, name="cos-webhook-worker", daemon=True).start()
