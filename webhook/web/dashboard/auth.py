"""Logging in to the dashboard: one password, a session per login kept in the ledger, a CSRF token on every POST.

The ledger (:attr:`Ledger.sessions`) holds what every web process must agree on: the password as a
salted scrypt hash, the random key that signs cookies, each login's session (as the SHA-256 of its
random id) and the wrong passwords per client address. Nothing the cookie carries depends on the
password, so a cookie is no help in guessing it; each guess costs a scrypt on the server, and from
the :data:`FREE_FAILURES`-th wrong one an address waits, longer each time, before it may try again.

The first process to serve the dashboard stores the hash and the key; a process configured with
another password replaces both, which ends every session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass
from datetime import timedelta

from flask import Flask, Request, Response, abort, current_app, g, request, session
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from itsdangerous import URLSafeTimedSerializer

from webhook.ledger import Failures, Ledger, LedgerError, Standing, utcnow
from webhook.ledger.sessions import COOKIE_KEY, PASSWORD_KEY

# A login lasts this long whatever the activity; then the login page again. A module constant,
# not a setting: one fixed working day is enough for an operator's console.
SESSION_SECONDS = 8 * 3600
COOKIE_NAME = "cos_webhook_dashboard"
COOKIE_PATH = "/dashboard"
CSRF_FIELD = "csrf_token"
SESSION_FIELD = "sid"
# Wrong passwords an address may send in a row before it must wait: FIRST_WAIT seconds after the
# last one, doubled with each further wrong one, up to LONGEST_WAIT (forgotten a day after the last).
FREE_FAILURES = 10
FIRST_WAIT = 60.0
LONGEST_WAIT = 3600.0
# scrypt at 16 MiB and about 0.1 s a guess: the cost is what makes a stolen hash slow to crack.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_ADDRESS_CHARS = 64  # the ledger's column; an IPv6 address with its zone fits


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt$hash`` with a random salt: what the ledger stores instead of the password."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    return "$".join(["scrypt", str(_SCRYPT_N), str(_SCRYPT_R), str(_SCRYPT_P), _b64(salt), _b64(digest)])


def password_matches(given: str, stored: str) -> bool:
    """Whether ``given`` is the password ``stored`` (from :func:`hash_password`) was made from; constant time."""
    _, n, r, p, salt, digest = stored.split("$")
    expected = base64.urlsafe_b64decode(digest)
    made = hashlib.scrypt(
        given.encode(), salt=base64.urlsafe_b64decode(salt), n=int(n), r=int(r), p=int(p), dklen=len(expected)
    )
    return hmac.compare_digest(made, expected)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


@dataclass(frozen=True)
class Keys:
    """What this process signs and checks with: the stored password hash and the cookie key."""

    password: str
    cookie: str

    @property
    def password_id(self) -> str:
        """The hash's salt: new with every password, so sessions name the password they were opened under."""
        return self.password.split("$")[4]


class _Agreed:
    """The keys, agreed with the ledger on first use (a scrypt and two reads) and kept for the process."""

    def __init__(self, ledger: Ledger, password: str) -> None:
        self._ledger, self._password = ledger, password
        self._lock = threading.Lock()
        self._keys: Keys | None = None

    def get(self) -> Keys:
        with self._lock:
            if self._keys is None:
                self._keys = self._agree()
            return self._keys

    def _agree(self) -> Keys:
        sessions = self._ledger.sessions
        for _ in range(3):
            stored = sessions.key(PASSWORD_KEY, lambda: hash_password(self._password))
            if password_matches(self._password, stored):
                return Keys(stored, sessions.key(COOKIE_KEY, lambda: secrets.token_urlsafe(32)))
            # Another password was stored before: this one replaces it, and every session ends.
            sessions.change_password(stored, hash_password(self._password), secrets.token_urlsafe(32))
        raise LedgerError("the dashboard password keeps changing: web processes are configured with different ones")


_KEYS = "cos_webhook_dashboard_keys"
_KEYS_FAILED = "dashboard_keys_failed"  # on ``g``: why this request's cookie could not be read


def configure(app: Flask, ledger: Ledger, password: str, https: bool) -> None:
    """Sessions in the ledger; the cookie is HttpOnly, SameSite=Lax, scoped to the dashboard, and
    Secure whenever the request came over HTTPS (or ``https`` says the service is only reached so)."""
    app.extensions[_KEYS] = _Agreed(ledger, password)
    app.config.update(
        SESSION_COOKIE_NAME=COOKIE_NAME,
        SESSION_COOKIE_PATH=COOKIE_PATH,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=timedelta(seconds=SESSION_SECONDS),
    )
    app.session_interface = _Sessions(https)


def keys(app: Flask) -> Keys:
    """``app``'s keys; raises :class:`LedgerError` while the ledger cannot give them."""
    agreed: _Agreed = app.extensions[_KEYS]
    return agreed.get()


def raise_unreadable_cookie() -> None:
    """Raise, inside the request (where the dashboard's error pages catch it), why its cookie went unread."""
    # Left on ``g``: the error page's response must not try to sign a cookie either.
    if (exc := g.get(_KEYS_FAILED)) is not None:
        raise exc


class _Sessions(SecureCookieSessionInterface):
    """Flask's signed cookie, with the ledger's key; only the dashboard's paths read it.

    The key may need the ledger, which Flask consults before any error handler is in place: a
    failure here leaves the request an empty session that is never saved, and the dashboard's
    guard raises it again where its error pages answer (503).
    """

    def __init__(self, https: bool) -> None:
        self._https = https

    def get_cookie_secure(self, app: Flask) -> bool:
        return self._https or came_over_https(request)

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer | None:
        # Flask's, with the ledger's key in place of app.secret_key: the same in every process.
        signer = {"key_derivation": self.key_derivation, "digest_method": self.digest_method}
        return URLSafeTimedSerializer(
            keys(app).cookie, salt=self.salt, serializer=self.serializer, signer_kwargs=signer
        )

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if not request.path.startswith(COOKIE_PATH):  # callbacks and probes never read the ledger for it
            return self.session_class()
        try:
            return super().open_session(app, request)
        except LedgerError as exc:
            g.setdefault(_KEYS_FAILED, exc)
            return self.session_class()

    def save_session(self, app: Flask, session: SecureCookieSession, response: Response) -> None:  # type: ignore[override]
        if _KEYS_FAILED not in g:
            super().save_session(app, session, response)


def came_over_https(req: Request) -> bool:
    """HTTPS here, or at the proxy in front. A client that claims it falsely only gets a cookie its
    own plain-HTTP requests will not carry, so the header needs no trust for this."""
    forwarded = req.headers.get("X-Forwarded-Proto", "")
    return req.is_secure or "https" in (part.strip().lower() for part in forwarded.split(","))


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


def client_address() -> str:
    """Whom wrong passwords are counted against: the address WEBHOOK_TRUSTED_PROXIES resolves, as
    for WEBHOOK_ALLOWED_SOURCES (so behind a proxy, the client's, not the proxy's)."""
    return (request.remote_addr or "")[:_ADDRESS_CHARS]


def login_wait(ledger: Ledger) -> float:
    """Seconds this client must wait before its password is checked again (0: now)."""
    return wait_after(ledger.sessions.failures(client_address()))


def wait_after(failures: Failures | None) -> float:
    if failures is None or failures.count < FREE_FAILURES:
        return 0.0
    delay = min(FIRST_WAIT * 2.0 ** (failures.count - FREE_FAILURES), LONGEST_WAIT)
    return max(0.0, delay - (utcnow() - failures.last_at).total_seconds())


def log_in(ledger: Ledger) -> None:
    """A fresh session (nothing of the one before is kept), valid for :data:`SESSION_SECONDS`."""
    session_id = secrets.token_urlsafe(32)
    ledger.sessions.open(session_id, keys(current_app).password_id, timedelta(seconds=SESSION_SECONDS))
    ledger.sessions.login_succeeded(client_address())
    session.clear()
    session.permanent = True
    session[SESSION_FIELD] = session_id
    session[CSRF_FIELD] = secrets.token_urlsafe(32)


def log_out(ledger: Ledger) -> None:
    """End the session in the ledger, so a copy of the cookie is refused too, then forget it here."""
    if isinstance(session_id := session.get(SESSION_FIELD), str):
        ledger.sessions.close(session_id)
    session.clear()


def state(ledger: Ledger) -> Standing:
    """Whether this request's session is a login now (in), was one too long ago (expired), or neither (out)."""
    session_id = session.get(SESSION_FIELD)
    if not isinstance(session_id, str):
        return Standing.OUT
    return ledger.sessions.standing(session_id, keys(current_app).password_id)
