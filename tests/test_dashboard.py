"""The dashboard: off without a password, login and its cookie, CSRF, expiry, and pages read from the ledger."""

from __future__ import annotations

import html
import re

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from markupsafe import escape
from support.pipeline import DONE, TOKEN, Pipeline, forged
from support.receiver import Reply
from support.tcp_proxy import proxied_database
from werkzeug.test import TestResponse

from webhook.config import Settings
from webhook.ledger import Ledger
from webhook.sinks.events import event_id
from webhook.web.app import create_app
from webhook.web.common import LEDGER_RETRY_AFTER
from webhook.web.dashboard import auth, pages

PASSWORD = "correct horse battery staple"
SCRIPT = "<script>document.title='pwned'</script><img src=x onerror=alert(1)>"


def dashboard(ledger: Ledger, password: str = PASSWORD, **settings: object) -> Flask:
    configured = Settings(database_url=ledger.url, callback_tokens=(TOKEN,), dashboard_password=password, **settings)
    return create_app(configured, ledger)


def token_of(response: TestResponse) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', response.text)
    assert found, response.text
    return found.group(1)


def log_in(client: FlaskClient, password: str = PASSWORD, next_page: str = "") -> TestResponse:
    token = token_of(client.get("/dashboard/login"))
    return client.post("/dashboard/login", data={"csrf_token": token, "password": password, "next": next_page})


def logged_in(app: Flask) -> FlaskClient:
    client = app.test_client()
    assert log_in(client).status_code == 303
    return client


def text_of(response: TestResponse) -> str:
    """The page's text as a reader sees it: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", " ", response.text))


# -- off unless configured ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/dashboard", "/dashboard/", "/dashboard/login", "/dashboard/static/dashboard.css"])
def test_no_password_no_dashboard(ledger: Ledger, path: str) -> None:
    client = dashboard(ledger, password="").test_client()
    assert client.get(path).status_code == 404
    assert client.post(path, data={"password": ""}).status_code in (404, 405)


# -- logging in ------------------------------------------------------------------------------


def test_pages_need_a_login_then_come_back(ledger: Ledger) -> None:
    client = dashboard(ledger).test_client()
    refused = client.get("/dashboard/jobs?status=dead")
    assert refused.status_code == 303
    assert refused.location == "/dashboard/login?next=/dashboard/jobs?status%3Ddead"

    answer = log_in(client, next_page="/dashboard/jobs?status=dead")
    assert (answer.status_code, answer.location) == (303, "/dashboard/jobs?status=dead")
    assert client.get("/dashboard/jobs?status=dead").status_code == 200


def test_a_wrong_password_is_401_and_says_nothing_more(ledger: Ledger) -> None:
    client = dashboard(ledger).test_client()
    wrong = ["", "x", PASSWORD[:-1], PASSWORD + " ", PASSWORD.upper(), "a" * 10_000]
    answers = [log_in(client, password) for password in wrong]

    assert {a.status_code for a in answers} == {401}
    assert {a.text for a in answers} == {answers[0].text}  # close or far, long or short: the same page
    assert "Login failed." in answers[0].text
    assert PASSWORD not in answers[0].text
    assert client.get("/dashboard/").status_code == 303  # still logged out


def test_a_login_cannot_send_the_browser_elsewhere(ledger: Ledger) -> None:
    app = dashboard(ledger)
    for target in ("https://evil.example/dashboard/", "//evil.example/dashboard/", "/callback/x", "/dashboardx"):
        assert log_in(app.test_client(), next_page=target).location == "/dashboard/"


def test_the_cookie_is_httponly_lax_scoped_and_secure_over_https(ledger: Ledger) -> None:
    cookie = log_in(dashboard(ledger).test_client()).headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Path=/dashboard" in cookie
    assert "Secure" not in cookie  # plain http: a Secure cookie would never come back

    behind_tls = dashboard(ledger).test_client()
    token = token_of(behind_tls.get("/dashboard/login"))
    answer = behind_tls.post(
        "/dashboard/login",
        data={"csrf_token": token, "password": PASSWORD},
        headers={"X-Forwarded-Proto": "https"},
    )
    assert "Secure" in answer.headers["Set-Cookie"]

    public = dashboard(ledger, public_url="https://hooks.example.com")
    assert "Secure" in log_in(public.test_client()).headers["Set-Cookie"]


def test_web_processes_share_logins_and_a_new_password_ends_them(ledger: Ledger) -> None:
    first, second = dashboard(ledger), dashboard(ledger)
    client = logged_in(first)
    cookie = client.get_cookie(auth.COOKIE_NAME, path=auth.COOKIE_PATH)
    assert cookie is not None

    other = second.test_client()
    other.set_cookie(auth.COOKIE_NAME, cookie.value, path=auth.COOKIE_PATH)
    assert other.get("/dashboard/").status_code == 200  # the session is in the ledger: any process accepts it

    rotated = dashboard(ledger, password=PASSWORD + " 2").test_client()
    rotated.set_cookie(auth.COOKIE_NAME, cookie.value, path=auth.COOKIE_PATH)
    answer = rotated.get("/dashboard/")
    assert answer.status_code == 303
    assert answer.location.startswith("/dashboard/login")
    assert client.get("/dashboard/").status_code == 303  # ended for the process that made it too


def test_an_expired_session_gets_the_login_page(ledger: Ledger) -> None:
    app = dashboard(ledger)
    client = logged_in(app)
    assert client.get("/dashboard/jobs").status_code == 200

    # As the ledger will hold the session SESSION_SECONDS after the login.
    with ledger.engine.begin() as conn:
        conn.execute(sa.text("UPDATE dashboard_sessions SET expires_at = created_at"))

    answer = client.get("/dashboard/jobs", follow_redirects=True)
    assert answer.request.path == "/dashboard/login"
    assert answer.status_code == 200
    assert "Your session expired: log in again." in answer.text
    assert client.get("/dashboard/jobs").status_code == 303  # and it stays logged out


def test_logout(ledger: Ledger) -> None:
    client = logged_in(dashboard(ledger))
    token = token_of(client.get("/dashboard/"))
    answer = client.post("/dashboard/logout", data={"csrf_token": token}, follow_redirects=True)
    assert answer.request.path == "/dashboard/login"
    assert "Logged out." in answer.text
    assert client.get("/dashboard/").status_code == 303


# -- CSRF ------------------------------------------------------------------------------------


def test_a_post_without_the_csrf_token_is_400(ledger: Ledger) -> None:
    app = dashboard(ledger)
    client = logged_in(app)
    form = {"mode": "job", "job": "j1", "sink": "", "confirm": "yes"}
    assert client.post("/dashboard/replay", data=form).status_code == 400
    assert client.post("/dashboard/replay", data=form | {"csrf_token": "forged"}).status_code == 400
    assert client.post("/dashboard/logout").status_code == 400
    assert client.get("/dashboard/").status_code == 200  # the refused logout did not happen

    fresh = app.test_client()
    fresh.get("/dashboard/login")
    assert fresh.post("/dashboard/login", data={"password": PASSWORD}).status_code == 400
    assert fresh.get("/dashboard/").status_code == 303


def test_pages_forbid_inline_scripts_and_framing(ledger: Ledger) -> None:
    answer = logged_in(dashboard(ledger)).get("/dashboard/")
    policy = answer.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "script-src" not in policy  # so no script at all, inline or not
    assert "frame-ancestors 'none'" in policy
    assert answer.headers["Cache-Control"] == "no-store"


# -- the ledger away ------------------------------------------------------------------------------

PAGES = ("/dashboard/", "/dashboard/jobs", "/dashboard/jobs/j1", "/dashboard/dead", "/dashboard/workers")


def assert_unavailable(answer: TestResponse, kind: str, problem: str = "") -> None:
    assert (answer.status_code, answer.headers.get("Retry-After")) == (503, LEDGER_RETRY_AFTER)
    said = " ".join(
        filter(None, [f"The ledger cannot be read just now ({kind}).", problem, "Try again in 30 seconds."])
    )
    assert said in text_of(answer)


def test_a_ledger_that_cannot_be_read_is_503_with_retry_after(ledger: Ledger) -> None:
    client = logged_in(dashboard(ledger))
    with ledger.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE attempts"))  # the overview reads the recent attempts
    sqlite = ledger.url.startswith("sqlite")
    # The page names what is wrong with the schema, which the operator can act on.
    assert_unavailable(
        client.get("/dashboard/"),
        "OperationalError" if sqlite else "ProgrammingError",
        "The ledger lacks tables attempts (run cos-webhook migrate).",
    )


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_every_page_is_503_while_the_ledger_is_unreachable_and_back_after(ledger: Ledger) -> None:
    with proxied_database(ledger.url) as (proxy, url):
        proxied = Ledger(url)
        client = logged_in(dashboard(proxied))
        proxy.down()
        for page in PAGES:
            assert_unavailable(client.get(page), "OperationalError")
        proxy.up()
        assert client.get("/dashboard/").status_code == 200
        proxied.dispose()


# -- pages, from a ledger the pipeline filled ----------------------------------------------------


@pytest.fixture
def dead_job(pipeline: Pipeline) -> str:
    """A job whose http delivery was refused for good (HTTP 400), its UserData a script."""
    pipeline.http.reply(Reply(400))
    job_id = pipeline.submit(pipeline.upload_input(), user_data=SCRIPT)
    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "dead"
    return job_id


@pytest.fixture
def client(pipeline: Pipeline) -> FlaskClient:
    return logged_in(create_app(pipeline.settings.replace(dashboard_password=PASSWORD), pipeline.ledger))


def test_dead_delivery_replayed_from_the_dead_letters_page(
    pipeline: Pipeline, dead_job: str, client: FlaskClient
) -> None:
    listing = client.get("/dashboard/dead?sink=http")
    assert dead_job in listing.text
    assert "http: HTTP 400 Bad Request (refused permanently)" in text_of(listing)
    form = {"csrf_token": token_of(listing), "mode": "dead", "job": dead_job, "sink": "http", "back": "/dashboard/dead"}

    confirm = client.post("/dashboard/replay", data=form)
    assert confirm.status_code == 200
    assert "Replay 1 dead letter?" in confirm.text
    assert pipeline.status(dead_job) == "dead"  # nothing happens before the confirmation

    done = client.post("/dashboard/replay", data=form | {"confirm": "yes"}, follow_redirects=True)
    assert done.request.path == "/dashboard/dead"
    assert "1 dead letter scheduled again." in done.text
    assert pipeline.status(dead_job) == "verified"

    again = client.post("/dashboard/replay", data=form | {"confirm": "yes"}, follow_redirects=True)
    assert "0 dead letters scheduled again. 1 no longer dead, left alone." in again.text

    pipeline.http.reply(Reply(200))
    assert pipeline.drain(pipeline.worker(), dead_job, DONE) == "delivered"
    page = text_of(client.get(f"/dashboard/jobs/{dead_job}"))
    assert re.search(r"delivery to http\s+done\s+1 attempt\b", page)
    assert client.get("/dashboard/dead").text.count(dead_job) == 0


def test_replay_one_sink_from_the_job_page(pipeline: Pipeline, dead_job: str, client: FlaskClient) -> None:
    page = client.get(f"/dashboard/jobs/{dead_job}")
    assert "Deliver again to http" in page.text
    back = f"/dashboard/jobs/{dead_job}"
    form = {"csrf_token": token_of(page), "mode": "job", "job": dead_job, "sink": "http", "back": back}
    assert "delivered again to http" in client.post("/dashboard/replay", data=form).text

    done = client.post("/dashboard/replay", data=form | {"confirm": "yes"}, follow_redirects=True)
    assert done.request.path == back
    assert f"Replay of {dead_job} scheduled for: http." in done.text
    [http] = [t for t in pipeline.ledger.views.show_job(dead_job).tasks if t.sink == "http"]
    assert http.status == "pending"
    # The timeline marks where the replay starts, and who asked.
    lane = done.text[done.text.index('id="lane-deliver-http"') :]
    assert '<span class="badge outcome-replayed">replayed</span>' in lane
    assert "dashboard 127.0.0.1" in lane

    unknown = client.post("/dashboard/replay", data=form | {"sink": "nope", "confirm": "yes"}, follow_redirects=True)
    assert "unknown sink &#39;nope&#39;; configured: filesystem, http" in unknown.text


def test_values_from_callbacks_are_shown_as_text(dead_job: str, client: FlaskClient) -> None:
    for path in ("/dashboard/jobs", f"/dashboard/jobs/{dead_job}"):
        answer = client.get(path)
        assert "<script>" not in answer.text
        assert "<img src=x" not in answer.text
        assert SCRIPT in text_of(answer)  # escaped, so it reads as what CI sent


def test_job_page_shows_callbacks_timeline_and_event_document(
    pipeline: Pipeline, dead_job: str, client: FlaskClient
) -> None:
    page = client.get(f"/dashboard/jobs/{dead_job}")
    text = text_of(page)
    [request] = pipeline.ledger.views.raw_callbacks(dead_job)
    assert str(escape(request.body.decode())) in page.text  # the raw body, escaped as Jinja does
    assert re.search(r"Verification:\s+accepted", text)
    for lane in ("verification", "fetch", "delivery to filesystem", "delivery to http"):
        assert lane in text
    assert '"schema": "cos-webhook.event/v1"' in text
    assert event_id(dead_job, "http") in text
    assert event_id(dead_job, "filesystem") in text
    assert client.get("/dashboard/jobs/no-such-job").status_code == 404


def test_overview_and_workers(pipeline: Pipeline, dead_job: str, client: FlaskClient) -> None:
    pipeline.ledger.workers.beat("elsewhere:4242:abcd1234", "elsewhere", 4242)
    page = client.get("/dashboard/")
    assert '<span class="count">1</span><span class="label">dead</span>' in page.text
    live = pipeline.ledger.stats.snapshot(pipeline.settings.heartbeat_seconds).live_workers
    assert live >= 1
    assert f'<span class="count" id="live-workers">{live}</span>' in page.text
    overview = text_of(page)
    assert re.search(r"deliver\s+http\s+0\s+—\s+1", overview)  # nothing due, one dead
    assert re.search(r"deliver\s+http\s+0\s+1\s+1", overview)  # last hour: 0 delivered, 1 failed (dead)
    assert re.search(r"deliver\s+filesystem\s+1\s+0", overview)

    workers = text_of(client.get("/dashboard/workers"))
    assert re.search(r"elsewhere:4242:abcd1234\s+elsewhere\s+4242", workers)
    assert "live" in workers


def test_jobs_filters_and_pages(
    pipeline: Pipeline, dead_job: str, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(3):
        assert pipeline.post_callback(forged(f"jforged{n}")).status_code == 200
    assert pipeline.post_callback(forged("jother", Tag="VoiceSeparate")).status_code == 200

    def shown(query: str) -> list[str]:
        return re.findall(r'href="/dashboard/jobs/([^"]+)"', client.get("/dashboard/jobs" + query).text)

    everything = {dead_job, "jforged0", "jforged1", "jforged2", "jother"}
    assert set(shown("")) == everything
    assert shown("?status=dead") == [dead_job]
    assert shown("?sink=http") == [dead_job]
    assert shown("?tag=VoiceSeparate") == ["jother"]
    assert sorted(shown("?q=forged")) == ["jforged0", "jforged1", "jforged2"]
    assert shown("?q=%25") == []  # a LIKE wildcard is a character like any other
    assert len(shown("?since=1h")) == 5
    assert shown("?until=2000-01-01T00:00") == []
    bad = client.get("/dashboard/jobs?since=yesterday")
    assert "is neither a duration like 2h or 3d nor an ISO date/time" in text_of(bad)

    monkeypatch.setattr(pages, "PER_PAGE", 2)
    first, second, third = shown("?page=1"), shown("?page=2"), shown("?page=3")
    assert [len(first), len(second), len(third)] == [2, 2, 1]
    assert set(first + second + third) == everything
    assert "page 2 of 3" in text_of(client.get("/dashboard/jobs?page=2"))


def test_replay_all_shown_dead_letters(pipeline: Pipeline, dead_job: str, client: FlaskClient) -> None:
    second = pipeline.submit(pipeline.upload_input(key="in/second.wav"), output_key="out/second.wav")
    assert pipeline.drain(pipeline.worker(), second, DONE) == "dead"

    listing = client.get("/dashboard/dead?kind=deliver&sink=http")
    form = re.search(r'<form [^>]*class="replay-all">(.*?)</form>', listing.text, re.S)
    assert form, listing.text
    fields = re.findall(r'name="([^"]+)" value="([^"]*)"', form.group(1))
    assert [value for name, value in fields if name == "job"] == [dead_job, second]
    data: dict[str, list[str]] = {}
    for name, value in fields:
        data.setdefault(name, []).append(html.unescape(value))

    confirm = client.post("/dashboard/replay", data=data)
    assert "Replay 2 dead letters?" in confirm.text
    done = client.post("/dashboard/replay", data=data | {"confirm": ["yes"]}, follow_redirects=True)
    assert done.request.full_path == "/dashboard/dead?kind=deliver&sink=http"
    assert "2 dead letters scheduled again." in done.text
    assert {pipeline.status(dead_job), pipeline.status(second)} == {"verified"}


def test_jobs_not_verified_have_no_event_and_cannot_be_redelivered(pipeline: Pipeline, client: FlaskClient) -> None:
    assert pipeline.post_callback(forged("jwaiting")).status_code == 200
    assert pipeline.post_callback(forged("jvoice", Tag="VoiceSeparate")).status_code == 200

    waiting = text_of(client.get("/dashboard/jobs/jwaiting"))
    assert re.search(r"Verification:\s+pending", waiting)
    assert "None: the job is not verified." in waiting
    ignored = text_of(client.get("/dashboard/jobs/jvoice"))
    assert "not verified (this request recorded the job as ignored)" in ignored
    assert "Replay" not in ignored

    token = token_of(client.get("/dashboard/jobs/jwaiting"))
    form = {"csrf_token": token, "mode": "job", "job": "jwaiting", "sink": "", "confirm": "yes"}
    answer = client.post("/dashboard/replay", data=form | {"back": "/dashboard/jobs/jwaiting"}, follow_redirects=True)
    assert "job jwaiting is received: it is waiting for verification, nothing to replay" in text_of(answer)


def test_page_links_carry_only_the_filters(
    pipeline: Pipeline, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(2):
        assert pipeline.post_callback(forged(f"jpage{n}")).status_code == 200
    monkeypatch.setattr(pages, "PER_PAGE", 1)
    answer = client.get("/dashboard/jobs?status=received&_external=1&_scheme=javascript&page=1")
    assert 'href="/dashboard/jobs?page=2&amp;status=received"' in answer.text
    assert "javascript" not in answer.text
    huge = client.get("/dashboard/jobs?page=99999999999999999999")
    assert huge.status_code == 200
    assert "2 jobs, page 100000 of 2" in text_of(huge)


def test_a_job_ci_reports_failed_is_shown_failed_with_ci_s_reason(pipeline: Pipeline, client: FlaskClient) -> None:
    job_id = pipeline.submit("in/missing.wav")
    assert pipeline.drain(pipeline.worker(), job_id, DONE, timeout=30) == "failed"
    reason = "CI reports Failed (InputObjectNotExist: the input object 'in/missing.wav' does not exist)"

    overview = client.get("/dashboard/")
    assert '<a class="card status-failed" href="/dashboard/jobs?status=failed">' in overview.text
    assert '<span class="count">1</span><span class="label">failed</span>' in overview.text
    listed = client.get("/dashboard/jobs?status=failed")
    assert '<span class="badge status-failed">failed</span>' in listed.text
    assert job_id in listed.text
    shown = client.get(f"/dashboard/jobs/{job_id}")
    assert '<span class="badge status-failed" id="job-status">failed</span>' in shown.text
    assert str(escape(reason)) in shown.text


def test_jobs_filter_by_ci_state_and_search_user_data(pipeline: Pipeline, client: FlaskClient) -> None:
    delivered = pipeline.submit(pipeline.upload_input(), user_data="订单-4711 customer=acme")
    failed = pipeline.submit("in/missing.wav", user_data="order-0815")
    worker = pipeline.worker()
    assert pipeline.drain(worker, delivered, DONE) == "delivered"
    assert pipeline.drain(worker, failed, DONE, timeout=30) == "failed"

    def shown(query: str) -> list[str]:
        return re.findall(r'href="/dashboard/jobs/([^"]+)"', client.get("/dashboard/jobs" + query).text)

    assert shown("?state=Failed") == [failed]
    assert shown("?state=Success") == [delivered]
    assert shown("?q=订单-47") == [delivered]  # non-ASCII, stored escaped in the job's JSON
    assert shown("?q=customer%3Dacme") == [delivered]
    assert shown("?q=0815") == [failed]
    assert shown("?q=in/missing.wav") == [failed]  # an object's key is searched too
    page = client.get("/dashboard/jobs?state=Failed")
    assert '<option value="Failed" selected>Failed</option>' in page.text


def test_pages_refresh_when_asked_and_only_then(pipeline: Pipeline, dead_job: str, client: FlaskClient) -> None:
    plain = client.get("/dashboard/jobs?status=dead")
    assert 'http-equiv="refresh"' not in plain.text
    assert 'href="/dashboard/jobs?status=dead&amp;refresh=5"' in plain.text

    asked = client.get("/dashboard/jobs?status=dead&refresh=5")
    assert '<meta http-equiv="refresh" content="5">' in asked.text
    assert '<b id="refresh-current">5 s</b>' in asked.text
    assert 'href="/dashboard/jobs?status=dead"' in asked.text  # off keeps the filters
    assert '<input type="hidden" name="refresh" value="5">' in asked.text  # filtering keeps refreshing
    job = client.get(f"/dashboard/jobs/{dead_job}?refresh=30")
    assert '<meta http-equiv="refresh" content="30">' in job.text
    assert 'http-equiv="refresh"' not in client.get("/dashboard/?refresh=7").text  # not one of the choices

    form = {"csrf_token": token_of(job), "mode": "job", "job": dead_job, "sink": "http", "back": "/dashboard/"}
    confirm = client.post("/dashboard/replay?refresh=5", data=form)
    assert 'http-equiv="refresh"' not in confirm.text  # reloading would send the form again


def test_replay_messages_say_what_will_really_happen(pipeline: Pipeline, dead_job: str, client: FlaskClient) -> None:
    assert pipeline.post_callback(forged("jnotci")).status_code == 200
    assert pipeline.drain(pipeline.worker(), "jnotci", DONE) == "rejected"
    reason = pipeline.ledger.views.show_job("jnotci").reason

    page = client.get("/dashboard/jobs/jnotci")
    assert '<span class="badge task-rejected">rejected</span>' in page.text  # not a green "done"
    form = {"csrf_token": token_of(page), "mode": "job", "sink": "", "back": "/dashboard/"}
    confirm = client.post("/dashboard/replay", data=form | {"job": ["jnotci", dead_job], "sink": ["", ""]})
    what = [html.unescape(cell) for cell in re.findall(r'<td class="what">(.*?)</td>', confirm.text)]
    assert what == [
        f"verified again against CI: delivered if CI now confirms it, else rejected again ({reason})",
        "delivered again to filesystem, http",
    ]
    done = client.post("/dashboard/replay", data=form | {"job": "jnotci", "confirm": "yes"}, follow_redirects=True)
    assert "jnotci will be verified again: delivered if CI now confirms it, else rejected again." in done.text
