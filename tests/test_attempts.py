"""Every attempt is history: the job's timeline in ``jobs show``, a fetch once per job, raw callbacks."""

from __future__ import annotations

import getpass
import json
import re
import socket

from click.testing import CliRunner
from support.pipeline import DONE, Pipeline, settings_env
from support.receiver import Reply

from webhook.cli import main
from webhook.dev.sandbox import Fault


def show(pipeline: Pipeline, *args: str) -> str:
    result = CliRunner().invoke(main, ["jobs", "show", *args], env=settings_env(pipeline.settings))
    assert result.exit_code == 0, result.output
    return result.output


def steps(pipeline: Pipeline, job_id: str) -> list[tuple[str, str | None, str, str]]:
    return [(a.step, a.sink, a.outcome, a.code) for a in pipeline.ledger.views.show_job(job_id).attempts]


def test_the_timeline_keeps_every_attempt_and_the_object_is_fetched_once(pipeline: Pipeline) -> None:
    pipeline.http.reply(Reply(503), Reply(200))
    gets = pipeline.sandbox.faults.add(Fault(kind="object GET", path="/out/*", delay=0.001))  # counts GETs
    job_id = pipeline.submit(pipeline.upload_input())
    pipeline.sandbox.wait_for_callbacks(1, timeout=20)

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"

    timeline = steps(pipeline, job_id)
    assert timeline[0] == ("verify", None, "ok", "")
    assert [t for t in timeline if t[1] == "http"] == [
        ("deliver", "http", "retry", "503"),
        ("deliver", "http", "ok", ""),
    ]
    assert [t for t in timeline if t[1] == "filesystem"] == [("deliver", "filesystem", "ok", "")]
    # Two claims fetched the object (the second from staging): COS served it once.
    assert [t for t in timeline if t[0] == "fetch"] == [("fetch", None, "ok", "")] * 2
    assert gets.fired == 1
    assert not list((pipeline.sink_dir.parent / "staging" / "cos-webhook-staged").iterdir())

    attempts = json.loads(show(pipeline, job_id, "--json"))["attempts"]
    assert [a["outcome"] for a in attempts] == [t[2] for t in timeline]
    assert all(a["worker_id"] and a["started_at"].endswith("Z") and a["duration_ms"] >= 0 for a in attempts)
    http_retry = next(a for a in attempts if a["outcome"] == "retry")
    assert http_retry["error"].startswith("http: ")
    assert "503" in http_retry["error"]


def test_replay_adds_attempts_and_never_erases_them(pipeline: Pipeline) -> None:
    job_id = pipeline.submit(pipeline.upload_input())
    pipeline.sandbox.wait_for_callbacks(1, timeout=20)
    worker = pipeline.worker()
    assert pipeline.drain(worker, job_id, DONE) == "delivered"
    before = steps(pipeline, job_id)

    replay = CliRunner().invoke(main, ["replay", job_id, "--sink", "http"], env=settings_env(pipeline.settings))
    assert replay.exit_code == 0, replay.output
    assert pipeline.drain(worker, job_id, DONE) == "delivered"

    after = steps(pipeline, job_id)
    assert after[: len(before)] == before
    # The replay is marked where it starts, in the lane of the step asked for again.
    assert after[len(before) :] == [
        ("deliver", "http", "replayed", ""),
        ("fetch", None, "ok", ""),
        ("deliver", "http", "ok", ""),
    ]
    [mark] = [a for a in pipeline.ledger.views.show_job(job_id).attempts if a.outcome == "replayed"]
    assert (mark.duration_ms, mark.worker_id) == (0, f"cli {getpass.getuser()}@{socket.gethostname()}")
    text = show(pipeline, job_id)
    assert text.count("deliver http") == 3
    assert re.search(rf"Z deliver http +replayed +0ms by cli {re.escape(getpass.getuser())}@", text), text
    assert "attempts:" in text


def test_raw_prints_every_request_that_named_the_job_behind_a_gutter(pipeline: Pipeline) -> None:
    job_id = pipeline.submit(pipeline.upload_input(), callback_format="XML")
    genuine = pipeline.sandbox.wait_for_callbacks(1, timeout=20)[0].body
    assert b"<UserData>order-42</UserData>" in genuine
    hostile = genuine.replace(b"order-42", b"x\r\n2026-01-01 00:00:00 INFO webhook.worker forged delivered")
    assert pipeline.post_callback(hostile).status_code == 200

    text = show(pipeline, job_id, "--raw")

    raw = text[text.index("request #") :].splitlines()
    assert sum(line.startswith("request #") for line in raw) == 2
    assert all(line.startswith(("request #", "  | ")) for line in raw), raw
    assert any(line.startswith("  | 2026-01-01 00:00:00 INFO webhook.worker forged delivered<") for line in raw)
    assert not any(line.startswith("2026-01-01") for line in text.splitlines())
    shown = json.loads(show(pipeline, job_id, "--raw", "--json"))["raw"]
    assert [r["body"].encode() for r in shown] == [genuine, hostile]
