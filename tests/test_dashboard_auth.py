"""The dashboard's login against offline guessing, online guessing and stolen cookies: sessions in the
ledger, a scrypt hash, a growing wait per client address, and the ledger's refusals answered 503."""

from __future__ import annotations

import base64
import json
import re
from datetime import timedelta

import requests
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from support.pipeline import TOKEN
from test_dashboard import PASSWORD, dashboard, log_in, logged_in, text_of, token_of
from werkzeug.test import TestResponse

from webhook.config import Settings
from webhook.ledger import Ledger, migrate, utcnow
from webhook.web.app import create_app
from webhook.web.dashboard import auth
from webhook.web.server import BackgroundServer

GUESSER = "198.51.100.7"
OPERATOR = "203.0.113.9"


def cookie_of(client: FlaskClient) -> str:
    cookie = client.get_cookie(auth.COOKIE_NAME, path=auth.COOKIE_PATH)
    assert cookie is not None
    return cookie.value


def with_cookie(app: Flask, value: str) -> FlaskClient:
    client = app.test_client()
    client.set_cookie(auth.COOKIE_NAME, value, path=auth.COOKIE_PATH)
    return client


def payload(cookie: str) -> dict[str, object]:
    """What a signed cookie carries (itsdangerous: base64 JSON, then timestamp and signature)."""
    data = cookie.split(".")[0]
    decoded: dict[str, object] = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
    return decoded


def stored_keys(ledger: Ledger) -> dict[str, str]:
    with ledger.engine.connect() as conn:
        return {str(row[0]): str(row[1]) for row in conn.execute(sa.text("SELECT name, value FROM dashboard_keys"))}


# -- nothing to guess offline ------------------------------------------------------------------------


def test_the_login_page_cookie_is_no_help_in_guessing_the_password(ledger: Ledger, tmp_path: object) -> None:
    client = dashboard(ledger).test_client()
    client.get("/dashboard/login")
    anonymous = cookie_of(client)
    assert set(payload(anonymous)) == {"csrf_token"}  # a random token, nothing else

    # The signing key is random, not made from the password: another ledger with the same password
    # signs with another key, and the ledger keeps only a salted scrypt hash of the password.
    other = Ledger(f"sqlite:///{tmp_path}/other.db")
    other.migrate()
    dashboard(other).test_client().get("/dashboard/login")
    mine, theirs = stored_keys(ledger), stored_keys(other)
    assert mine["cookie"] != theirs["cookie"]
    assert mine["password"].startswith("scrypt$16384$8$1$")
    assert mine["password"] != theirs["password"]  # salted
    assert PASSWORD not in mine["password"]
    other.dispose()

    # Logged in, the cookie carries a random session id: the same shape under any password.
    session = payload(cookie_of(logged_in(dashboard(ledger))))
    assert set(session) == {"_permanent", "csrf_token", "sid"}
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", str(session["sid"]))


# -- revoked cookies ---------------------------------------------------------------------------------


def test_logging_out_ends_the_session_for_every_copy_of_the_cookie(ledger: Ledger) -> None:
    app = dashboard(ledger)
    client = logged_in(app)
    copied = with_cookie(dashboard(ledger), cookie_of(client))
    assert copied.get("/dashboard/").status_code == 200

    token = token_of(client.get("/dashboard/"))
    assert client.post("/dashboard/logout", data={"csrf_token": token}).status_code == 303

    answer = copied.get("/dashboard/")
    assert (answer.status_code, answer.location) == (303, "/dashboard/login?next=/dashboard/")
    with ledger.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM dashboard_sessions")).scalar_one() == 0


def test_a_new_password_ends_every_session_and_the_old_password_no_longer_logs_in(ledger: Ledger) -> None:
    before = logged_in(dashboard(ledger))
    cookie = cookie_of(before)
    rotated = dashboard(ledger, password="a new password for the dashboard")

    assert rotated.test_client().get("/dashboard/login").status_code == 200  # the new password is stored now
    assert before.get("/dashboard/").status_code == 303
    assert with_cookie(rotated, cookie).get("/dashboard/").status_code == 303
    assert log_in(rotated.test_client()).status_code == 401
    assert log_in(rotated.test_client(), "a new password for the dashboard").status_code == 303


# -- online guessing --------------------------------------------------------------------------------


def test_the_eleventh_quick_wrong_login_waits_and_other_addresses_do_not(ledger: Ledger) -> None:
    # Behind one trusted proxy: the client is the address it forwards, as for WEBHOOK_ALLOWED_SOURCES.
    app = dashboard(ledger, trusted_proxies=1)

    def attempt(client: FlaskClient, password: str, address: str) -> TestResponse:
        token = token_of(client.get("/dashboard/login"))
        return client.post(
            "/dashboard/login",
            data={"csrf_token": token, "password": password},
            headers={"X-Forwarded-For": address},
            environ_base={"REMOTE_ADDR": "10.0.0.1"},
        )

    guesser = app.test_client()
    assert [attempt(guesser, f"guess {n}", GUESSER).status_code for n in range(auth.FREE_FAILURES)] == [401] * 10

    eleventh = attempt(guesser, "guess 11", GUESSER)
    wait = int(eleventh.headers["Retry-After"])
    assert (eleventh.status_code, 0 < wait <= auth.FIRST_WAIT) == (429, True)
    assert f"Too many wrong passwords from your address: try again in {wait} seconds." in text_of(eleventh)
    assert attempt(guesser, PASSWORD, GUESSER).status_code == 429  # the right one waits its turn too
    other_process = dashboard(ledger, trusted_proxies=1).test_client()
    assert attempt(other_process, PASSWORD, GUESSER).status_code == 429  # counted in the ledger, for all

    assert attempt(app.test_client(), PASSWORD, OPERATOR).status_code == 303  # same proxy, another client


def test_the_wait_doubles_with_each_wrong_password_and_a_login_forgets_them() -> None:
    def failures(count: int, seconds_ago: float) -> auth.Failures:
        return auth.Failures(count, utcnow() - timedelta(seconds=seconds_ago))

    assert auth.wait_after(None) == 0
    assert auth.wait_after(failures(9, 0)) == 0
    assert 59 < auth.wait_after(failures(10, 0)) <= 60
    assert 119 < auth.wait_after(failures(11, 0)) <= 120
    assert auth.wait_after(failures(10, 61)) == 0
    assert 3599 < auth.wait_after(failures(30, 0)) <= 3600


def test_a_right_password_forgets_the_wrong_ones(ledger: Ledger) -> None:
    client = dashboard(ledger).test_client()
    for _ in range(auth.FREE_FAILURES - 1):
        assert log_in(client, "wrong").status_code == 401
    assert log_in(client).status_code == 303
    assert ledger.sessions.failures("127.0.0.1") is None


# -- several web processes ---------------------------------------------------------------------------


def test_two_web_processes_on_one_ledger_share_sessions(ledger: Ledger) -> None:
    with BackgroundServer(dashboard(ledger)) as first, BackgroundServer(dashboard(ledger)) as second:
        browser = requests.Session()  # one cookie jar for both: cookies are per host, not per port
        form = browser.get(f"{first.url}/dashboard/login", timeout=30)
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token
        data = {"csrf_token": token.group(1), "password": PASSWORD}
        answer = browser.post(f"{first.url}/dashboard/login", data=data, allow_redirects=False, timeout=30)
        assert answer.status_code == 303

        assert browser.get(f"{second.url}/dashboard/workers", allow_redirects=False, timeout=30).status_code == 200
        page = browser.get(f"{second.url}/dashboard/", timeout=30)
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token
        out = browser.post(f"{second.url}/dashboard/logout", data={"csrf_token": token.group(1)}, timeout=30)
        assert out.url.endswith("/dashboard/login")
        assert browser.get(f"{first.url}/dashboard/", allow_redirects=False, timeout=30).status_code == 303


# -- expired sessions are pruned -----------------------------------------------------------------------


def test_retention_prunes_expired_sessions_and_keeps_live_ones(ledger: Ledger) -> None:
    app = dashboard(ledger)
    old = logged_in(app)
    with ledger.engine.begin() as conn:
        conn.execute(sa.text("UPDATE dashboard_sessions SET expires_at = created_at"))
    current = logged_in(app)

    assert ledger.retention.prune(utcnow()).sessions == 1
    assert current.get("/dashboard/").status_code == 200
    assert old.get("/dashboard/").status_code == 303
    with ledger.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM dashboard_sessions")).scalar_one() == 1


# -- the ledger behind or refusing ------------------------------------------------------------------


def test_a_ledger_whose_schema_is_behind_is_a_503_naming_it(database_url: str) -> None:
    behind = Ledger(database_url)
    migrate.upgrade(behind.engine, "0006")  # before the dashboard's tables
    settings = Settings(database_url=database_url, callback_tokens=(TOKEN,), dashboard_password=PASSWORD)
    answer = create_app(settings, behind).test_client().get("/dashboard/login")

    assert answer.status_code == 503
    needed = f"The ledger is at revision 0006, this version needs {migrate.head()}: run cos-webhook migrate."
    assert needed in text_of(answer)
    behind.dispose()


def test_a_write_the_ledger_refuses_is_a_503_saying_so(ledger: Ledger) -> None:
    app = dashboard(ledger)
    client = app.test_client()
    token = token_of(client.get("/dashboard/login"))
    with ledger.engine.begin() as conn:  # a constraint no new session can meet
        if ledger.engine.dialect.name == "sqlite":
            conn.execute(
                sa.text(
                    "CREATE TRIGGER no_sessions BEFORE INSERT ON dashboard_sessions"
                    " BEGIN SELECT RAISE(ABORT, 'no new sessions'); END"
                )
            )
        else:
            conn.execute(sa.text("ALTER TABLE dashboard_sessions ADD CONSTRAINT no_sessions CHECK (false) NOT VALID"))

    answer = client.post("/dashboard/login", data={"csrf_token": token, "password": PASSWORD})

    assert answer.status_code == 503
    said = "The ledger refused to store this (IntegrityError); the log says why. Trying again will not help."
    assert said in text_of(answer)
    assert client.get("/dashboard/").status_code == 303  # no session was made
