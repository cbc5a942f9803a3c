"""The dashboard's blueprint and what every page shares: the login guard, headers, errors, formatting."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, flash, redirect, render_template, request, session, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from webhook.ledger import LedgerError, LedgerRefused, LedgerUnavailable, Standing, utcnow
from webhook.web.common import LEDGER_RETRY_AFTER, runtime
from webhook.web.dashboard.auth import COOKIE_PATH, CSRF_FIELD, check_csrf, csrf_token, raise_unreadable_cookie, state

log = logging.getLogger(__name__)
bp = Blueprint(
    "dashboard",
    __name__,
    url_prefix=COOKIE_PATH,
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)

# Reachable without logging in: the login form and the stylesheet it uses.
_OPEN = {"dashboard.login", "dashboard.static"}

# Nothing inline and nothing from elsewhere: should a ledger value ever reach the page unescaped,
# the browser still runs none of it.
_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


@bp.before_request
def _guard() -> BaseResponse | None:
    raise_unreadable_cookie()
    if request.endpoint not in _OPEN:
        standing = state(runtime(current_app).ledger)
        if standing != Standing.IN:
            session.clear()
            if standing == Standing.EXPIRED:
                flash("Your session expired: log in again.")
            # After login, a page comes back; a form sent with an expired session is not resent.
            wanted = request.full_path.rstrip("?") if request.method == "GET" else None
            return redirect(url_for("dashboard.login", next=wanted), 303)
    if request.method == "POST":
        check_csrf()
    return None


# Seconds an operator may ask a page to reload after (``?refresh=N``): a meta refresh, so still no script.
REFRESH_CHOICES = (5, 30)


@bp.context_processor
def _refresh() -> dict[str, Any]:
    """``refresh`` (0: off) and ``refresh_url(n)``: this page with refreshing every ``n`` s (0: off).

    Only a GET page refreshes: reloading the answer to a form would send the form again.
    """
    asked = request.args.get("refresh", "")
    seconds = int(asked) if request.method == "GET" and asked.isdigit() and int(asked) in REFRESH_CHOICES else 0

    def refresh_url(every: int) -> str:
        # url_for reads some names (_external, _scheme) itself: a query never passes them on.
        kept = {k: v for k, v in request.args.items() if k != "refresh" and not k.startswith("_")}
        asked_for: dict[str, Any] = (request.view_args or {}) | kept | ({"refresh": str(every)} if every else {})
        return url_for(str(request.endpoint), **asked_for)

    return {"refresh": seconds, "refresh_url": refresh_url, "refresh_choices": REFRESH_CHOICES}


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = _POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "dashboard.static":
        response.headers["Cache-Control"] = "no-store"
    return response


@bp.errorhandler(HTTPException)
def _error(exc: HTTPException) -> tuple[str, int]:
    status = exc.code or 500
    return render_template("error.html", status=status, title=exc.name, message=exc.description), status


@bp.errorhandler(LedgerUnavailable)
def _ledger_unavailable(exc: LedgerUnavailable) -> tuple[str, int, dict[str, str]]:
    # Every page reads the ledger: while it is away the page says so and when to try again, as the
    # callback endpoint does, rather than a bare 500 that looks like a bug in the dashboard.
    log.warning("dashboard: %s", exc)
    message = f"The ledger cannot be read just now ({exc.kind})."
    if problem := _schema_problem(exc):
        message += f" {problem[0].upper()}{problem[1:]}."
    return _unavailable("Ledger unavailable", f"{message} Try again in {LEDGER_RETRY_AFTER} seconds.")


@bp.errorhandler(LedgerRefused)
def _ledger_refused(exc: LedgerRefused) -> tuple[str, int, dict[str, str]]:
    # What the ledger would not store (a constraint, a value it cannot hold): asking again fails alike.
    log.error("dashboard: the ledger refused a write (%s: %s)", exc.kind, exc.detail)
    message = f"The ledger refused to store this ({exc.kind}); the log says why. Trying again will not help."
    return render_template("error.html", status=503, title="Ledger refused", message=message), 503, {}


@bp.errorhandler(LedgerError)
def _ledger_error(exc: LedgerError) -> tuple[str, int, dict[str, str]]:
    log.error("dashboard: %s", exc)
    return _unavailable("Ledger not usable", f"{str(exc)[0].upper()}{str(exc)[1:]}.")


def _unavailable(title: str, message: str) -> tuple[str, int, dict[str, str]]:
    page = render_template("error.html", status=503, title=title, message=message)
    return page, 503, {"Retry-After": LEDGER_RETRY_AFTER}


def _schema_problem(exc: LedgerUnavailable) -> str | None:
    """What is wrong with the ledger's schema (behind, a table missing), when that may be the cause.

    Only when the database answered: PostgreSQL names a missing table a ProgrammingError, and SQLite
    (a local file) answers at once. An unreachable server is not asked a second time.
    """
    ledger = runtime(current_app).ledger
    if exc.kind != "ProgrammingError" and ledger.engine.dialect.name != "sqlite":
        return None
    try:
        return ledger.schema_problem()
    except LedgerError:
        return None


@bp.app_template_filter("when")
def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value else "—"


@bp.app_template_filter("ago")
def _ago(value: datetime | None) -> str:
    """How long before now, e.g. ``4m 12s``; ``in 30s`` for a time still to come."""
    if value is None:
        return "—"
    seconds = int((utcnow() - value).total_seconds())
    text = duration(abs(seconds))
    return text if seconds >= 0 else f"in {text}"


@bp.app_template_filter("duration")
def duration(seconds: float) -> str:
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60}s"
    if whole < 86400:
        return f"{whole // 3600}h {whole % 3600 // 60}m"
    return f"{whole // 86400}d {whole % 86400 // 3600}h"


@bp.app_context_processor
def _shared() -> dict[str, Any]:
    return {"csrf_token": csrf_token, "csrf_field": CSRF_FIELD}


def local_target(target: str | None, default: str) -> str:
    """``target`` if it is a path of the dashboard, else ``default``: never a redirect elsewhere."""
    if not target:
        return default
    parts = urlsplit(target)
    inside = parts.path == COOKIE_PATH or parts.path.startswith(COOKIE_PATH + "/")
    if parts.scheme or parts.netloc or not inside or "\\" in target or target.startswith("//"):
        return default
    return target
