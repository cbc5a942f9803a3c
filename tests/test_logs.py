"""Logs cannot be forged: every record is one line, whatever a callback or a remote answer holds."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.logs import records, root_log
from support.pipeline import BUCKET, REGION, Pipeline, settings_env
from support.processes import start_worker
from support.samples import body, job, json_doc

from webhook.logs import OneLineFormatter, escape

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
    assert f" ERROR webhook.worker job=j1{shown} failed\\nTraceback (most recent call last):\\n  File " in line
    assert line.endswith(f"ValueError: bad value{shown}")


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
