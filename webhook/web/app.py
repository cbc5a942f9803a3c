"""The Flask application: :func:`create_app` builds it, and does nothing else.

Starting a web process (logging, the ledger's schema, a worker beside the handlers) is
:mod:`webhook.web.launch`'s; what the blueprints share is in :mod:`webhook.web.common`.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from webhook.config import Settings
from webhook.intake import http as receive
from webhook.ledger import Ledger
from webhook.telemetry.logs import REQUEST_ID_HEADER, begin_request, end_request
from webhook.web import dashboard, health
from webhook.web.common import EXTENSION, Runtime, error, in_networks

log = logging.getLogger(__name__)


def create_app(settings: Settings, ledger: Ledger | None = None) -> Flask:
    """The web app for ``settings``, recording into ``ledger`` (default: the one they name).

    Nothing is migrated, checked or started: the app touches the ledger only when it serves.
    """
    settings.check_receiver()
    ledger = ledger or Ledger(settings.database_url)

    app = _App(__name__)
    _trace_requests(app)  # first: whatever runs before the view logs with the request's id
    # Werkzeug refuses a larger declared body before reading it, and cuts a chunked one off.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions[EXTENSION] = Runtime(settings=settings, ledger=ledger)
    app.register_blueprint(receive.bp)
    app.register_blueprint(health.bp)
    if settings.dashboard_password:  # otherwise /dashboard is a 404 like any unknown path
        dashboard.install(app, settings, ledger)
    if settings.trusted_proxies:
        # Behind N proxies the client is the N-th address from the right of X-Forwarded-For;
        # anything further left was written by the client and is not trusted.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies)  # type: ignore[method-assign]

    @app.before_request
    def _source_allowed() -> tuple[Response, int] | None:
        if not settings.allowed_sources or not request.path.startswith("/callback/"):
            return None
        if in_networks(request.remote_addr or "", settings.allowed_sources):
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
        if request.path in health.UNLOGGED:  # probes and scrapes every few seconds would drown the log
            return response
        path, status = _redacted(request.path), response.status_code
        access = {"remote_addr": request.remote_addr, "method": request.method, "path": path, "status": status}
        # One line per request: what the view had to say about it (a callback's outcome) is on it too.
        access |= g.get("access_fields", {})
        log.info("%s %s %s %s", request.remote_addr, request.method, path, status, extra=access)
        return response

    return app


def _trace_requests(app: Flask) -> None:
    """Every record written while a request is served carries its id, which the response returns.

    The id is the request's ``X-Request-Id`` when that is a valid id (a router or a client set
    it), else a new one.
    """

    @app.before_request
    def _begin() -> None:
        g.request_id = begin_request(request.headers.get(REQUEST_ID_HEADER))

    @app.after_request
    def _return_id(response: Response) -> Response:
        response.headers[REQUEST_ID_HEADER] = g.request_id
        return response

    @app.teardown_request
    def _end(exc: BaseException | None) -> None:
        end_request()


class _App(Flask):
    def log_exception(self, exc_info: Any) -> None:
        # Flask's own version logs request.path, which carries the callback token.
        self.logger.error("Exception on %s [%s]", _redacted(request.path), request.method, exc_info=exc_info)


def _redacted(path: str) -> str:
    """The request path without the callback token, which is a credential."""
    return "/callback/<token>" if path.startswith("/callback/") else path
