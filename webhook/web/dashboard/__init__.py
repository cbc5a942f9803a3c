"""The operator's dashboard at ``/dashboard``, served by the web process when a password is set.

Server-rendered pages (no script at all) read from the ledger, so any number of web processes
show the same; replays go through the same functions as the ``replay`` command.
"""

from __future__ import annotations

from flask import Flask

from webhook.config import Settings
from webhook.ledger import Ledger
from webhook.web.dashboard import actions, auth, pages
from webhook.web.dashboard.blueprint import bp

__all__ = ["actions", "install", "pages"]


def install(app: Flask, settings: Settings, ledger: Ledger) -> None:
    """Serve the dashboard on ``app``; only called when ``WEBHOOK_DASHBOARD_PASSWORD`` is set."""
    auth.configure(app, ledger, settings.dashboard_password, https=settings.public_url.startswith("https://"))
    app.register_blueprint(bp)
