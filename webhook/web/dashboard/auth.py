"""Logging in to the dashboard: one password, a signed session cookie, a CSRF token on every POST.

The cookie is signed with a key derived from the password, so every web process signs and checks
it alike without sharing state, and changing the password logs everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from datetime import timedelta
from typing import Any

from flask import Flask, Request, abort, request, session
from flask.sessions import SecureCookieSessionInterface

# A login lasts this long whatever the activity; then the login page again. A module constant,
# not a setting: one fixed working day is enough for an operator's console.
SESSION_SECONDS = 8 * 3600
COOKIE_NAME = "cos_webhook_dashboard"
COOKIE_PATH = "/dashboard"
CSRF_FIELD = "csrf_token"
# Fixed and public: it only separates this key from any other use of the same password.
_KEY_SALT = b"cos-webhook dashboard session key v1"


def secret_key(password: str) -> bytes:
    """The session signing key: the same in every process with the same password."""
    return hmac.new(_KEY_SALT, password.encode(), hashlib.sha256).digest()


def configure(app: Flask, password: str, https: bool) -> None:
    """Sign sessions with the password's key; the cookie is HttpOnly, SameSite=Lax, scoped to the dashboard,
    and Secure whenever the request came over HTTPS (or ``https`` says the service is only reached so)."""
    app.secret_key = secret_key(password)
    app.config.update(
        SESSION_COOKIE_NAME=COOKIE_NAME,
        SESSION_COOKIE_PATH=COOKIE_PATH,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=timedelta(seconds=SESSION_SECONDS),
    )
    app.session_interface = _Sessions(https)


class _Sessions(SecureCookieSessionInterface):
    def __init__(self, https: bool) -> None:
        self._https = https

    def get_cookie_secure(self, app: Flask) -> bool:
        return self._https or came_over_https(request)


def came_over_https(req: Request) -> bool:
    """HTTPS here, or at the proxy in front. A client that claims it falsely only gets a cookie its
    own plain-HTTP requests will not carry, so the header needs no trust for this."""
    forwarded = req.headers.get("X-Forwarded-Proto", "")
    return req.is_secure or "https" in (part.strip().lower() for part in forwarded.split(","))


def password_matches(given: str, password: str) -> bool:
    """Constant time, and the digests hide the password's length too."""
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(password.encode()).digest())


def csrf_token() -> str:
    """This session's token, made on first use (the login form of a visitor without a session too)."""
    token = session.get(CSRF_FIELD)
    if not isinstance(token, str):
        token = session[CSRF_FIELD] = secrets.token_urlsafe(32)
    return token


def check_csrf() -> None:
    """Refuse (400) a POST whose form does not carry this session's token."""
    expected = session.get(CSRF_FIELD)
    given = request.form.get(CSRF_FIELD, "")
    if not isinstance(expected, str) or not hmac.compare_digest(given.encode(), expected.encode()):
        abort(400, "missing or wrong CSRF token: reload the page and try again")


def log_in() -> None:
    """A fresh session (a token fixed before login is not kept), valid for :data:`SESSION_SECONDS`."""
    session.clear()
    session.permanent = True
    session["since"] = time.time()
    session[CSRF_FIELD] = secrets.token_urlsafe(32)


def log_out() -> None:
    session.clear()


def state() -> str:
    """``in``, ``expired`` (logged in too long ago) or ``out``."""
    since: Any = session.get("since")
    if not isinstance(since, int | float):
        return "out"
    if not 0 <= time.time() - since <= SESSION_SECONDS:
        return "expired"
    return "in"
