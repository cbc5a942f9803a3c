"""The Flask application factory."""

from __future__ import annotations

import ipaddress
import logging
import threading
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from webhook import health, receive
from webhook.config import Settings
from webhook.ledger import Ledger
from webhook.logs import setup_logging
from webhook.web import EXTENSION, Runtime, error

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, ledger: Ledger | None = None) -> Flask:
    """Build the web app; reads settings from the environment unless given."""
    settings = settings or Settings.from_env()
    settings.check_receiver()
    setup_logging(settings.log_level)
    ledger = ledger or Ledger(settings.database_url)
    ledger.create_schema()

    app = _App(__name__)
    # Werkzeug refuses a larger declared body before reading it, and cuts a chunked one off.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions[EXTENSION] = Runtime(settings=settings, ledger=ledger)
    app.register_blueprint(receive.bp)
    app.register_blueprint(health.bp)
    if settings.trusted_proxies:
        # Behind N proxies the client is the N-th address from the right of X-Forwarded-For;
        # anything further left was written by the client and is not trusted.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies)  # type: ignore[method-assign]

    @app.before_request
    def _source_allowed() -> tuple[Response, int] | None:
        if not settings.allowed_sources or not request.path.startswith("/callback/"):
            return None
        if _in_networks(request.remote_addr or "", settings.allowed_sources):
            return None
        log.warning("callback refused: source %s is not in WEBHOOK_ALLOWED_SOURCES", request.remote_addr)
        return error(403, f"source address {request.remote_addr} is not allowed")

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        messages = {413: f"body is larger than {settings.max_body_bytes} bytes"}
        response, status = error(status, messages.get(status, exc.description or exc.name))
        if "Allow" in (headers := dict(exc.get_headers())):
            response.headers["Allow"] = headers["Allow"]
        return response, status

    @app.after_request
    def _access_log(response: Response) -> Response:
        log.info("%s %s %s %s", request.remote_addr, request.method, _redacted(request.path), response.status_code)
        return response

    if settings.run_worker_in_web:
        _start_worker_thread(settings, ledger)
    return app


class _App(Flask):
    def log_exception(self, exc_info: Any) -> None:
        # Flask's own version logs request.path, which carries the callback token.
        self.logger.error("Exception on %s [%s]", _redacted(request.path), request.method, exc_info=exc_info)


def _redacted(path: str) -> str:
    """The request path without the callback token, which is a credential."""
    return "/callback/<token>" if path.startswith("/callback/") else path


def _in_networks(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _start_worker_thread(settings: Settings, ledger: Ledger) -> None:
    """Single-process deploys: run a worker beside the web handlers."""
    from webhook.worker import Worker

    worker = Worker.from_settings(settings, ledger)
    threading.Thread(target=worker.run, name="cos-webhook-worker", daemon=True).start()
