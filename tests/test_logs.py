"""Logs cannot be forged: every record is one line, as text or JSON, whatever a callback or a remote answer holds."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st
from qcloud_cos.cos_exception import CosServiceError
from support.logs import json_records, records, root_log
from support.pipeline import BUCKET, REGION, TOKEN, Pipeline, settings_env
from support.processes import start_worker, wait_healthy, web
from support.samples import DOC_JOB, body, job, json_doc

from webhook.dev.sandbox import Sandbox
from webhook.ledger import Delivery
from webhook.models import TaskKind
from webhook.telemetry.logs import JsonLineFormatter, OneLineFormatter, escape, fields, formatter, quote

# A value that, written raw, would end its record and start a line claiming a delivery.
FORGED = "\n2026-01-01 00:00:00 INFO webhook.worker job=x sink=y delivered"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("a\nb", r"a\nb"),
        ("a\r\nb", r"a\r\nb"),
        ("tab\there", r"tab\there"),
        ("\x1b[31mred\x1b[0m", r"\x1b[31mred\x1b[0m"),
        ("bell\x07 nul\x00 del\x7f", r"bell\x07 nul\x00 del\x7f"),
        ("next line\x85, separators\u2028\u2029", r"next line\x85, separators\u2028\u2029"),
        ("bidi \u202egnp.exe", r"bidi \u202egnp.exe"),
        ("lone surrogate \udcff", r"lone surrogate \udcff"),
        ("音频降噪 café, a literal \\n stays", "音频降噪 café, a literal \\n stays"),
    ],
)
def test_escape_makes_every_unprintable_character_visible(text: str, shown: str) -> None:
    assert escape(text) == shown


@given(st.text())
def test_escaped_text_is_printable_and_keeps_printable_text(text: str) -> None:
    escaped = escape(text)
    assert escaped.isprintable()
    assert len(escaped.splitlines()) <= 1
    if text.isprintable():
        assert escaped == text


def test_a_traceback_stays_on_its_record_s_line() -> None:
    try:
        raise ValueError("bad value" + FORGED)
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("webhook.worker", logging.ERROR, "", 1, "job=%s failed", ("j1" + FORGED,), exc_info)

    (line,) = records(OneLineFormatter().format(record) + "\n")

    shown = escape(FORGED)
    assert f' ERROR webhook.worker job="j1{shown}" failed\\nTraceback (most recent call last):\\n  File ' in line
    assert line.endswith(f"ValueError: bad value{shown}")


@pytest.mark.slow  # a worker process
def test_forged_lines_in_a_callback_stay_inside_their_record(pipeline: Pipeline, tmp_path: Path) -> None:
    forged_bucket = job("j-forged-bucket", Input={"BucketId": BUCKET + FORGED, "Object": "in/a.wav", "Region": REGION})
    with root_log() as web_log:
        genuine = pipeline.submit(pipeline.upload_input())
        pipeline.wait_until(lambda: pipeline.status(genuine) == "received", what="the genuine callback")
        assert pipeline.post_callback(json_doc(job("j-forged-event"), event="TaskFinish" + FORGED)).status_code == 200
        assert pipeline.post_callback(body("xml", forged_bucket)).status_code == 200

    worker_log = tmp_path / "worker.log"
    assert start_worker(settings_env(pipeline.settings), worker_log, "--burst").wait(timeout=60) == 0

    assert [pipeline.status(j) for j in (genuine, "j-forged-event", "j-forged-bucket")] == [
        "delivered",
        "ignored",
        "rejected",
    ]
    shown = escape(FORGED)
    for log in (web_log.getvalue(), worker_log.read_text()):
        lines = records(log)
        assert shown in log  # the forged text was logged, inside another record
        assert not [line for line in lines if line.startswith("2026-01-01 00:00:00")]
    worker_lines = records(worker_log.read_text())
    assert [line.partition(" INFO ")[2] for line in worker_lines if line.endswith("delivered attempt=1")] == [
        f"webhook.worker job={genuine} sink=filesystem delivered attempt=1",
        f"webhook.worker job={genuine} sink=http delivered attempt=1",
    ]


# How a reader takes a text line apart: tokens split at spaces, a double-quoted value (with \" and
# \\ inside) being part of its token whatever it holds.
TEXT_TOKEN = re.compile(r'(?:[^\s"]|"(?:[^"\\]|\\.)*")+')
PLANTED = "x job=j123 sink=http"


def fields_read(line: str) -> list[tuple[str, str]]:
    """The ``key=value`` fields a reader finds in ``line``, quoted values unquoted."""
    found = []
    for token in TEXT_TOKEN.findall(line):
        key, is_field, value = token.partition("=")
        if is_field and key.isidentifier():
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            found.append((key, value))
    return found


def test_a_value_with_spaces_or_equals_signs_cannot_pass_for_a_field_of_its_own() -> None:
    cases = [
        ("rejected: %s", (f"user data '{PLANTED}' differs from CI's",)),
        ("attempt %d failed: %s", (2, ValueError(PLANTED))),
    ]
    for message, args in cases:
        record = logging.LogRecord("webhook.worker", logging.WARNING, "", 1, message, args, None)
        record.__dict__.update({"job_id": "j1", "sink": PLANTED, "reason": PLANTED})

        line = OneLineFormatter().format(record)

        read = fields_read(line)
        assert [value for key, value in read if key == "job"] == ["j1"], line
        assert ("sink", PLANTED) in read
        assert ("reason", PLANTED) in read
        assert PLANTED in line.replace('\\"', '"')  # still there to read, inside its quotes
        assert record.args == args  # the record itself is left as it was, for other handlers


@given(st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs"))))
def test_a_quoted_value_reads_back_as_itself(value: str) -> None:
    assert fields_read(f"job=j1 reason={quote(value)} step=deliver") == [
        ("job", "j1"),
        ("reason", value),
        ("step", "deliver"),
    ]


def test_plain_values_stay_unquoted() -> None:
    words = logging.LogRecord("webhook.worker", logging.INFO, "", 1, "stopping (%s)", ("signal SIGTERM",), None)
    assert OneLineFormatter().format(words).endswith(" stopping (signal SIGTERM)")  # no = nor quote: as it is
    assert [quote(v) for v in ("j-1", "TaskFinish", 3, "out/a.wav")] == ["j-1", "TaskFinish", "3", "out/a.wav"]
    assert [quote(v) for v in ("", "a b", 'say "hi"', "a\\b")] == ['""', '"a b"', '"say \\"hi\\""', '"a\\\\b"']


# -- JSON ------------------------------------------------------------------------------------------


def test_a_json_record_is_one_line_whatever_it_holds() -> None:
    odd = FORGED + "\x1b[31m\x7f\x85\u2028\u202e\udcff 音频"
    try:
        raise ValueError("bad value" + odd)
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("webhook.worker", logging.ERROR, "", 1, "failed: %s", (odd,), exc_info)
    record.job_id, record.sink, record.attempt = "j1" + FORGED, "http", 2

    (found,) = json_records(JsonLineFormatter().format(record) + "\n")

    assert found["msg"] == "failed: " + odd
    about = {key: found[key] for key in ("level", "logger", "job_id", "sink", "attempt")}
    assert about == {
        "level": "ERROR",
        "logger": "webhook.worker",
        "job_id": "j1" + FORGED,
        "sink": "http",
        "attempt": 2,
    }
    assert found["exc_info"].startswith("Traceback (most recent call last):\n")
    assert found["exc_info"].endswith("ValueError: bad value" + odd)


def test_text_writes_what_a_record_is_about_before_its_message() -> None:
    delivery = Delivery(id=1, job_id="j1", kind=TaskKind.DELIVER, attempts=2, sink="http")
    record = logging.LogRecord("webhook.worker", logging.WARNING, "", 1, "attempt %d failed", (2,), None)
    record.__dict__.update(fields(delivery, step=True))

    line = OneLineFormatter().format(record)

    assert line.endswith(" WARNING webhook.worker job=j1 step=deliver sink=http attempt 2 failed")
    assert fields(delivery) == {"job_id": "j1", "sink": "http", "attempt": 2}
    assert fields(DOC_JOB) == {"job_id": DOC_JOB.job_id}  # a job, not a task: its id only


@pytest.mark.parametrize(("terminal", "chosen"), [(True, OneLineFormatter), (False, JsonLineFormatter)])
def test_auto_is_text_on_a_terminal_and_json_elsewhere(
    monkeypatch: pytest.MonkeyPatch, terminal: bool, chosen: type[logging.Formatter]
) -> None:
    monkeypatch.setattr(sys, "stderr", type("Stderr", (), {"isatty": lambda self: terminal})())
    assert type(formatter("auto")) is chosen
    assert type(formatter("json")) is JsonLineFormatter
    assert type(formatter("text")) is OneLineFormatter


def test_a_delivery_line_has_its_job_sink_and_attempt(pipeline: Pipeline) -> None:
    with root_log(log_format="json") as log:
        job_id = pipeline.submit(pipeline.upload_input())
        assert pipeline.drain(pipeline.worker(), job_id, {"delivered"}) == "delivered"

    delivered = [r for r in json_records(log.getvalue()) if r["msg"] == "delivered attempt=1"]
    assert [(r["logger"], r["job_id"], r["sink"], r["attempt"]) for r in delivered] == [
        ("webhook.worker", job_id, "filesystem", 1),
        ("webhook.worker", job_id, "http", 1),
    ]
    assert "request_id" not in delivered[0]  # no web request here


def test_every_record_of_a_request_carries_the_id_its_response_returns(pipeline: Pipeline) -> None:
    with root_log(log_format="json") as log:
        stored = pipeline.post_callback(json_doc(job("j-logged")))
        refused = requests.post(
            pipeline.callback_url, data=b"{", headers={"X-Request-Id": "router-7f3a.42"}, timeout=10
        )
        invalid = requests.post(pipeline.callback_url, data=b"{", headers={"X-Request-Id": "no spaces"}, timeout=10)

    assert (stored.status_code, refused.status_code, invalid.status_code) == (200, 400, 400)
    ids = [r.headers["X-Request-Id"] for r in (stored, refused, invalid)]
    assert ids[1] == "router-7f3a.42"  # a router's id is kept, to follow a request across both logs
    assert re.fullmatch("[0-9a-f]{32}", ids[0])
    assert re.fullmatch("[0-9a-f]{32}", ids[2])
    web = [r for r in json_records(log.getvalue()) if r["logger"] in ("webhook.intake.http", "webhook.web.app")]
    by_id = {request_id: [r for r in web if r.get("request_id") == request_id] for request_id in ids}
    assert [len(lines) for lines in by_id.values()] == [1, 1, 1]  # the access line, which says the outcome too
    (access,), (refusal,), _ = by_id.values()
    assert (access["logger"], access["method"], access["path"], access["status"]) == (
        "webhook.web.app",
        "POST",
        "/callback/<token>",
        200,
    )
    assert (access["event"], access["body_format"], access["new"], access["duplicate"], access["ignored"]) == (
        "TaskFinish",
        "json",
        "j-logged",
        "-",
        "-",
    )
    assert isinstance(access["callback_id"], int)
    assert (refusal["status"], refusal["reason"]) == (400, refused.json()["error"])
    assert TOKEN not in log.getvalue()


def test_a_callback_is_one_text_line_that_says_how_it_was_answered(pipeline: Pipeline) -> None:
    with root_log(log_format="text") as log:
        pipeline.post_callback(json_doc(job("j-text")))
        pipeline.post_callback(json_doc(job("j-text")))
        requests.post(pipeline.callback_url, data=b"<Response>", timeout=10)
    lines = [
        line for line in log.getvalue().splitlines() if " webhook.web.app " in line or " webhook.intake.http " in line
    ]
    assert [line.split(" webhook.web.app ", 1)[1] for line in lines] == [
        f"127.0.0.1 POST /callback/<token> 200 id={n} event=TaskFinish format=json {outcome} token=1"
        for n, outcome in ((1, "new=j-text duplicate=- ignored=-"), (2, "new=- duplicate=j-text ignored=-"))
    ] + ['127.0.0.1 POST /callback/<token> 400 reason="malformed XML: no element found: line 1, column 10" token=1']


@pytest.mark.slow  # a worker process
def test_forged_lines_stay_inside_their_json_record(pipeline: Pipeline, tmp_path: Path) -> None:
    forged_bucket = job("j-forged-bucket", Input={"BucketId": BUCKET + FORGED, "Object": "in/a.wav", "Region": REGION})
    with root_log(log_format="json") as web_log:
        assert pipeline.post_callback(json_doc(job("j-forged-event"), event="TaskFinish" + FORGED)).status_code == 200
        assert pipeline.post_callback(body("xml", forged_bucket)).status_code == 200
    worker_log = tmp_path / "worker.log"
    # auto: the worker's stderr is a file, not a terminal, so it writes JSON.
    env = settings_env(pipeline.settings) | {"WEBHOOK_LOG_FORMAT": "auto"}
    assert start_worker(env, worker_log, "--burst").wait(timeout=60) == 0

    assert pipeline.status("j-forged-bucket") == "rejected"
    stored = [r for r in json_records(web_log.getvalue()) if "event" in r]
    assert stored[0]["event"] == "TaskFinish" + FORGED
    (rejected,) = [r for r in json_records(worker_log.read_text()) if r["msg"].startswith("rejected: ")]
    assert FORGED in rejected["msg"]
    assert (rejected["logger"], rejected["level"], rejected["job_id"]) == (
        "webhook.worker",
        "WARNING",
        "j-forged-bucket",
    )


def test_the_sdk_logs_through_the_same_handler(sandbox: Sandbox) -> None:
    with root_log(log_format="json") as log, pytest.raises(CosServiceError):
        sandbox.client(REGION).head_object(Bucket=BUCKET, Key="no/such/object.wav")

    assert any(r["logger"].startswith("qcloud_cos.") for r in json_records(log.getvalue()))


@pytest.mark.slow  # gunicorn
def test_gunicorn_writes_its_own_lines_as_json(pipeline: Pipeline, tmp_path: Path) -> None:
    log = tmp_path / "web.log"
    env = settings_env(pipeline.settings) | {"WEBHOOK_LOG_FORMAT": "json", "WEB_CONCURRENCY": "1"}
    with web(env, log) as (url, proc):
        wait_healthy(url, proc, log)
        answer = requests.post(f"{url}/callback/{TOKEN}", data=json_doc(job("j-under-gunicorn")), timeout=10)
    assert answer.status_code == 200

    found = json_records(log.read_text())
    own = [r["msg"] for r in found if r["logger"] == "gunicorn.error"]
    assert any(msg.startswith("Starting gunicorn ") for msg in own)
    assert any(msg.startswith("Listening at: ") for msg in own)
    assert any(msg.startswith("Booting worker with pid: ") for msg in own)
    (access,) = [r for r in found if r["logger"] == "webhook.web.app"]
    assert (access["path"], access["status"], access["request_id"]) == (
        "/callback/<token>",
        200,
        answer.headers["X-Request-Id"],
    )
    assert TOKEN not in log.read_text()


@pytest.mark.slow  # gunicorn
def test_a_worker_boot_failure_under_gunicorn_is_one_json_record(tmp_path: Path) -> None:
    message = "WEBHOOK_CALLBACK_TOKEN must be 16 to 256 characters from A-Z a-z 0-9 . _ ~ -"
    log = tmp_path / "web.log"
    env = {
        "WEBHOOK_DATABASE_URL": f"sqlite:///{tmp_path / 'l.db'}",
        "WEBHOOK_CALLBACK_TOKEN": "short",
        "WEBHOOK_LOG_FORMAT": "json",
        # One worker: with two, the second's exit can reach gunicorn's master while it is already
        # halting for the first, and gunicorn then prints its own HaltServer traceback raw.
        "WEB_CONCURRENCY": "1",
    }
    with web(env, log) as (_, proc):
        assert proc.wait(timeout=30) != 0

    lines = log.read_text().splitlines()
    # gunicorn prints the message of a boot failure once more on stderr itself, outside logging.
    assert {line for line in lines if not line.startswith("{")} == {message}
    found = json_records("".join(line + "\n" for line in lines if line.startswith("{")))
    (failure, *_) = [r for r in found if r["msg"] == "Exception in worker process"]
    assert (failure["logger"], failure["level"]) == ("gunicorn.error", "ERROR")
    assert failure["exc_info"].startswith("Traceback (most recent call last):\n")
    assert failure["exc_info"].endswith(message)
