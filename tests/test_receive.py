"""The callback endpoint over a real socket, against SQLite and PostgreSQL ledgers.

Every accepted callback is in the ledger before the 200; every refused one leaves no row behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from support.endpoint import NOTHING, TOKEN, post, row_counts, serving
from support.samples import BAD_INPUTS, DOC_JOB, DOC_JSON, DOC_XML, FORMATS, JOB_ID, body, job

from webhook.ledger import Ledger
from webhook.ledger.schema import callbacks
from webhook.models import JobStatus, job_to_dict

OTHER_TOKEN = "cb-fedcba9876543210~next"
SMALL_LIMIT = 2048
OTHER_ID = "j0000000000000000000000000000000b"


@pytest.fixture
def base_url(ledger: Ledger) -> Iterator[str]:
    with serving(ledger) as url:
        yield url


@pytest.fixture
def small_url(ledger: Ledger) -> Iterator[str]:
    """A server that accepts bodies of at most SMALL_LIMIT bytes."""
    with serving(ledger, max_body_bytes=SMALL_LIMIT) as url:
        yield url


def callback_rows(ledger: Ledger) -> list[Any]:
    with ledger.engine.connect() as conn:
        return list(conn.execute(sa.select(callbacks).order_by(callbacks.c.id)))


def answer(
    *job_ids: str, duplicates: tuple[str, ...] = (), ignored: tuple[str, ...] = (), event: str = "TaskFinish"
) -> dict[str, Any]:
    """The documented 200 body."""
    return {
        "event": event,
        "jobs": [{"job_id": j, "duplicate": False} for j in job_ids]
        + [{"job_id": j, "duplicate": True} for j in duplicates],
        "duplicate": bool(duplicates) and not job_ids,
        "ignored": list(ignored),
        "capped": [],
    }


def assert_error(response: requests.Response, status: int, message: str) -> None:
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"error": message, "status": status}


# -- accepted callbacks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sample", "content_type", "fmt"),
    [(DOC_XML, "application/xml", "xml"), (DOC_JSON, "application/json", "json")],
    ids=FORMATS,
)
def test_documented_callback_is_stored_then_answered(
    ledger: Ledger, base_url: str, sample: bytes, content_type: str, fmt: str
) -> None:
    response = post(base_url, sample, content_type)

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == answer(JOB_ID)

    view = ledger.views.show_job(JOB_ID).to_dict()
    assert (view["job_id"], view["tag"], view["event_name"]) == (JOB_ID, "NoiseReduction", "TaskFinish")
    assert (view["state"], view["status"], view["reason"]) == ("Success", "received", "")
    assert len(view["verify"]) == 1
    verify = view["verify"][0]
    assert (verify["status"], verify["attempts"], verify["last_error"], verify["done_at"]) == ("pending", 0, "", None)
    assert view["deliveries"] == []
    assert view["detail"] == job_to_dict(DOC_JOB)

    [row] = callback_rows(ledger)
    assert bytes(row.body) == sample
    assert (row.body_format, row.event_name, row.content_type) == (fmt, "TaskFinish", content_type)
    assert row_counts(ledger) == {"callbacks": 1, "jobs": 1, "job_versions": 1, "tasks": 1}


@pytest.mark.parametrize("fmt", FORMATS)
def test_raw_body_with_bom_whitespace_and_non_ascii_is_stored_byte_for_byte(
    ledger: Ledger, base_url: str, fmt: str
) -> None:
    sent = b"\xef\xbb\xbf \r\n" + body(fmt, job(Message="降噪完成 & <ok>")) + b"\n"

    assert post(base_url, sent).json() == answer(JOB_ID)

    [row] = callback_rows(ledger)
    assert bytes(row.body) == sent
    assert ledger.views.show_job(JOB_ID).job.message == "降噪完成 & <ok>"


@pytest.mark.parametrize("fmt", FORMATS)
def test_several_jobs_each_get_one_verify_task(ledger: Ledger, base_url: str, fmt: str) -> None:
    response = post(base_url, body(fmt, [job(), job(OTHER_ID, State="Failed")]))

    assert response.json() == answer(JOB_ID, OTHER_ID)
    assert row_counts(ledger) == {"callbacks": 1, "jobs": 2, "job_versions": 2, "tasks": 2}
    for job_id in (JOB_ID, OTHER_ID):
        view = ledger.views.show_job(job_id).to_dict()
        assert view["status"] == "received"
        assert [v["status"] for v in view["verify"]] == ["pending"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_job_is_received_with_one_verify_task(ledger: Ledger, base_url: str, fmt: str) -> None:
    detail = job(State="Failed", Code="InvalidParameter", Message="The audio file is damaged")

    assert post(base_url, body(fmt, detail)).json() == answer(JOB_ID)

    view = ledger.views.show_job(JOB_ID).to_dict()
    assert (view["state"], view["status"]) == ("Failed", "received")
    assert (view["detail"]["code"], view["detail"]["message"]) == ("InvalidParameter", "The audio file is damaged")
    assert [v["status"] for v in view["verify"]] == ["pending"]
    assert view["deliveries"] == []


@pytest.mark.parametrize(("first", "second"), [("xml", "xml"), ("json", "json"), ("xml", "json"), ("json", "xml")])
def test_duplicate_callback_is_answered_200_and_stored_once(
    ledger: Ledger, base_url: str, first: str, second: str
) -> None:
    assert post(base_url, body(first, job())).json() == answer(JOB_ID)

    again = post(base_url, body(second, job()))

    assert again.status_code == 200
    assert again.json() == {
        "event": "TaskFinish",
        "jobs": [{"job_id": JOB_ID, "duplicate": True}],
        "duplicate": True,
        "ignored": [],
        "capped": [],
    }
    assert row_counts(ledger) == {"callbacks": 2, "jobs": 1, "job_versions": 1, "tasks": 1}
    assert [row.body_format for row in callback_rows(ledger)] == [first, second]
    assert [v["status"] for v in ledger.views.show_job(JOB_ID).to_dict()["verify"]] == ["pending"]


def test_callback_with_new_and_repeated_jobs_is_not_a_duplicate(ledger: Ledger, base_url: str) -> None:
    post(base_url, body("xml", job()))

    response = post(base_url, body("json", [job(), job(OTHER_ID)]))

    assert response.json() == {
        "event": "TaskFinish",
        "jobs": [{"job_id": OTHER_ID, "duplicate": False}, {"job_id": JOB_ID, "duplicate": True}],
        "duplicate": False,
        "ignored": [],
        "capped": [],
    }
    assert row_counts(ledger) == {"callbacks": 2, "jobs": 2, "job_versions": 2, "tasks": 2}


def test_duplicate_job_ids_in_one_callback_store_one_job(ledger: Ledger, base_url: str) -> None:
    response = post(base_url, body("json", [job(), job(State="Failed")]))

    assert response.json() == answer(JOB_ID)
    assert row_counts(ledger) == {"callbacks": 1, "jobs": 1, "job_versions": 1, "tasks": 1}
    assert ledger.views.show_job(JOB_ID).state == "Success"


@pytest.mark.parametrize("fmt", FORMATS)
def test_other_tag_is_recorded_as_ignored_without_tasks(ledger: Ledger, base_url: str, fmt: str) -> None:
    response = post(base_url, body(fmt, job(Tag="VoiceSeparate")))

    assert response.status_code == 200
    assert response.json() == answer(JOB_ID, ignored=(JOB_ID,))
    view = ledger.views.show_job(JOB_ID).to_dict()
    assert (view["tag"], view["status"]) == ("VoiceSeparate", "ignored")
    assert view["reason"] == "tag VoiceSeparate is not in WEBHOOK_ALLOWED_TAGS"
    assert (view["verify"], view["deliveries"]) == ([], [])
    assert row_counts(ledger) == {"callbacks": 1, "jobs": 1, "job_versions": 0, "tasks": 0}


def test_mixed_tags_forward_only_the_allowed_one(ledger: Ledger, base_url: str) -> None:
    response = post(base_url, body("xml", [job(), job(OTHER_ID, Tag="VoiceSeparate")]))

    assert response.json() == answer(JOB_ID, OTHER_ID, ignored=(OTHER_ID,))
    assert ledger.views.show_job(JOB_ID).status == "received"
    assert ledger.views.show_job(OTHER_ID).status == "ignored"
    assert row_counts(ledger) == {"callbacks": 1, "jobs": 2, "job_versions": 1, "tasks": 1}


@pytest.mark.parametrize("fmt", FORMATS)
def test_workflow_finish_is_recorded_without_jobs(ledger: Ledger, base_url: str, fmt: str) -> None:
    sent = body(fmt, event="WorkflowFinish", WorkflowExecution={"RunId": "i5f7a", "State": "Success"})

    response = post(base_url, sent)

    assert response.status_code == 200
    assert response.json() == answer(event="WorkflowFinish")
    [row] = callback_rows(ledger)
    assert (bytes(row.body), row.event_name, row.body_format) == (sent, "WorkflowFinish", fmt)
    assert row_counts(ledger) == {"callbacks": 1, "jobs": 0, "job_versions": 0, "tasks": 0}


def test_workflow_finish_with_jobsdetail_forwards_its_jobs(ledger: Ledger, base_url: str) -> None:
    # A workflow run's jobs are verified like a task's: DescribeMediaJob decides.
    response = post(base_url, body("json", job(), event="WorkflowFinish"))

    assert response.json() == answer(JOB_ID, event="WorkflowFinish")
    assert ledger.views.show_job(JOB_ID).to_dict()["status"] == "received"
    assert row_counts(ledger) == {"callbacks": 1, "jobs": 1, "job_versions": 1, "tasks": 1}


def test_other_events_with_jobsdetail_record_jobs_as_ignored(ledger: Ledger, base_url: str) -> None:
    response = post(base_url, body("json", job(), event="TaskStart"))

    assert response.json() == answer(JOB_ID, ignored=(JOB_ID,), event="TaskStart")
    view = ledger.views.show_job(JOB_ID).to_dict()
    assert (view["status"], view["reason"]) == ("ignored", "event TaskStart is recorded, not forwarded")
    assert row_counts(ledger) == {"callbacks": 1, "jobs": 1, "job_versions": 0, "tasks": 0}


@pytest.mark.parametrize(
    ("content_type", "fmt"),
    [
        (None, "xml"),
        (None, "json"),
        ("text/plain", "xml"),
        ("text/plain; charset=utf-8", "json"),
        ("application/json", "xml"),
        ("application/xml", "json"),
        ("application/x-www-form-urlencoded", "json"),
        ("multipart/form-data; boundary=x", "xml"),
    ],
)
def test_content_type_does_not_matter(ledger: Ledger, base_url: str, content_type: str | None, fmt: str) -> None:
    sent = body(fmt, job())

    response = post(base_url, sent, content_type)

    assert response.status_code == 200
    assert response.json() == answer(JOB_ID)
    [row] = callback_rows(ledger)
    assert (bytes(row.body), row.body_format, row.content_type) == (sent, fmt, content_type or "")


def test_chunked_body_within_the_limit_is_stored_whole(ledger: Ledger, small_url: str) -> None:
    sent = body("xml", job())
    assert len(sent) < SMALL_LIMIT

    response = post(small_url, (sent[i : i + 100] for i in range(0, len(sent), 100)))

    assert response.status_code == 200
    assert response.request.headers["Transfer-Encoding"] == "chunked"
    [row] = callback_rows(ledger)
    assert bytes(row.body) == sent


def test_body_of_exactly_the_limit_is_accepted(ledger: Ledger, small_url: str) -> None:
    sent = body("json", job())
    sent += b" " * (SMALL_LIMIT - len(sent))

    assert post(small_url, sent).status_code == 200
    assert bytes(callback_rows(ledger)[0].body) == sent


def test_either_of_two_configured_tokens_is_accepted(ledger: Ledger) -> None:
    with serving(ledger, tokens=(TOKEN, OTHER_TOKEN)) as url:
        old = post(url, body("xml", job()), token=TOKEN)
        new = post(url, body("json", job(OTHER_ID)), token=OTHER_TOKEN)
        unknown = post(url, body("json", job("j3")), token=TOKEN[:-1] + "2")

    assert (old.status_code, new.status_code) == (200, 200)
    assert old.json() == answer(JOB_ID)
    assert new.json() == answer(OTHER_ID)
    assert_error(unknown, 404, "unknown callback URL")
    assert row_counts(ledger) == {"callbacks": 2, "jobs": 2, "job_versions": 2, "tasks": 2}


# -- refused requests -------------------------------------------------------------------------------


def test_bad_body_is_refused_400_with_parser_message_and_nothing_stored(
    ledger: Ledger, base_url: str, subtests: pytest.Subtests
) -> None:
    # One server and ledger for the whole table, not one per case; a case that stored anything is
    # the first subtest to fail, the rest then fail on the leftover rows.
    for case_id, sent, message in BAD_INPUTS:
        with subtests.test(case_id):
            response = post(base_url, sent, "application/json")

            assert_error(response, 400, message)
            assert row_counts(ledger) == NOTHING


def _chunks(data: bytes, size: int = 512) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


OVER_LIMIT = body("json", job(Message="m" * 3000))
assert len(OVER_LIMIT) > SMALL_LIMIT
OVER_LIMIT_PADDED = body("json", job()) + b" " * 3000


@pytest.mark.parametrize(
    ("method", "token", "data", "status", "message"),
    [
        pytest.param("POST", "wrong-token-0123456789", DOC_XML, 404, "unknown callback URL", id="wrong-token"),
        pytest.param("POST", TOKEN[:-1], DOC_XML, 404, "unknown callback URL", id="token-prefix"),
        pytest.param("POST", TOKEN[:8], DOC_XML, 404, "unknown callback URL", id="short-token-prefix"),
        pytest.param("POST", TOKEN + "x", DOC_XML, 404, "unknown callback URL", id="token-with-suffix"),
        pytest.param("POST", TOKEN.upper(), DOC_XML, 404, "unknown callback URL", id="token-other-case"),
        pytest.param("POST", "%E4%BB%A4" + TOKEN, DOC_XML, 404, "unknown callback URL", id="token-non-ascii"),
        pytest.param("POST", "wrong-token-0123456789", OVER_LIMIT, 404, "unknown callback URL", id="wrong-token-big"),
        pytest.param(
            "POST", TOKEN, OVER_LIMIT, 413, f"body is larger than {SMALL_LIMIT} bytes", id="content-length-over"
        ),
        pytest.param(
            "POST", TOKEN, OVER_LIMIT_PADDED, 413, f"body is larger than {SMALL_LIMIT} bytes", id="padded-over"
        ),
        pytest.param("GET", TOKEN, None, 405, "The method is not allowed for the requested URL.", id="get"),
        pytest.param("PUT", TOKEN, DOC_XML, 405, "The method is not allowed for the requested URL.", id="put"),
        pytest.param("DELETE", TOKEN, None, 405, "The method is not allowed for the requested URL.", id="delete"),
    ],
)
def test_refused_request_stores_nothing(
    ledger: Ledger, small_url: str, method: str, token: str, data: bytes | None, status: int, message: str
) -> None:
    response = requests.request(method, f"{small_url}/callback/{token}", data=data, timeout=30)

    assert_error(response, status, message)
    assert row_counts(ledger) == NOTHING


def test_chunked_body_over_the_limit_is_refused_4xx_and_not_stored(ledger: Ledger, small_url: str) -> None:
    response = post(small_url, _chunks(OVER_LIMIT))

    assert response.request.headers["Transfer-Encoding"] == "chunked"
    assert 400 <= response.status_code < 500
    assert response.json()["status"] == response.status_code
    assert row_counts(ledger) == NOTHING


@pytest.mark.parametrize("sent", [OVER_LIMIT, OVER_LIMIT_PADDED], ids=["truncates-to-malformed", "truncates-to-valid"])
def test_chunked_body_over_the_limit_is_refused_413(ledger: Ledger, small_url: str, sent: bytes) -> None:
    response = post(small_url, _chunks(sent))

    assert_error(response, 413, f"body is larger than {SMALL_LIMIT} bytes")
    assert row_counts(ledger) == NOTHING


def test_json_integer_over_4300_digits_is_refused_400(ledger: Ledger, base_url: str) -> None:
    sent = body("json", job()).replace(b'"JobLevel": "0"', b'"JobLevel": 1' + b"0" * 5000)

    response = post(base_url, sent)

    assert response.status_code == 400
    assert response.json()["status"] == 400
    assert row_counts(ledger) == NOTHING


# -- health and metrics ------------------------------------------------------------------------------


def test_healthz_reports_ok(base_url: str) -> None:
    response = requests.get(f"{base_url}/healthz", timeout=30)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_metrics_count_the_received_job(base_url: str) -> None:
    assert post(base_url, DOC_XML).status_code == 200

    response = requests.get(f"{base_url}/metrics", timeout=30)

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    lines = response.text.splitlines()
    assert 'cos_webhook_jobs{status="received"} 1.0' in lines
    assert 'cos_webhook_tasks_due{kind="verify",sink=""} 1.0' in lines


def test_metrics_do_not_count_refused_callbacks(base_url: str) -> None:
    assert post(base_url, b"<Response/>").status_code == 400

    lines = requests.get(f"{base_url}/metrics", timeout=30).text.splitlines()

    assert [line for line in lines if line.startswith("cos_webhook_jobs{")] == [
        f'cos_webhook_jobs{{status="{status}"}} 0.0' for status in sorted(JobStatus)
    ]
    assert 'cos_webhook_tasks_due{kind="verify",sink=""} 0.0' in lines


def test_a_ledger_that_cannot_be_written_answers_503_and_keeps_nothing(ledger: Ledger, base_url: str) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE job_versions"))  # every callback now fails to commit

    response = post(base_url, body("json", job()))

    assert_error(response, 503, "ledger unavailable, retry later")
    assert response.headers["Retry-After"] == "30"
    with ledger.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(callbacks)).scalar_one() == 0
