"""The operator's commands, run as a user would, against a ledger the pipeline filled."""

from __future__ import annotations

import json
import re

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from support.endpoint import post, serving
from support.pipeline import Pipeline, settings_env
from support.samples import job, json_doc

from webhook.cli import main
from webhook.config import Settings
from webhook.intake.callback import parse_callback
from webhook.intake.triage import triage
from webhook.ledger import Ledger, RawRequest
from webhook.ledger.migrate import head

DONE = {"delivered", "rejected", "dead"}


def run(pipeline: Pipeline, *args: str, **env: str) -> Result:
    return CliRunner().invoke(main, list(args), env=settings_env(pipeline.settings) | env)


@pytest.fixture
def delivered_job(pipeline: Pipeline) -> str:
    job_id = pipeline.submit(pipeline.upload_input())
    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"
    return job_id


def test_jobs_show_json(pipeline: Pipeline, delivered_job: str) -> None:
    result = run(pipeline, "jobs", "show", delivered_job, "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert {k: shown[k] for k in ("job_id", "tag", "state", "status", "reason")} == {
        "job_id": delivered_job,
        "tag": "NoiseReduction",
        "state": "Success",
        "status": "delivered",
        "reason": "",
    }
    assert [(d["sink"], d["status"], d["attempts"], d["last_error"]) for d in shown["deliveries"]] == [
        ("filesystem", "done", 1, ""),
        ("http", "done", 1, ""),
    ]


def test_jobs_show_text(pipeline: Pipeline, delivered_job: str) -> None:
    result = run(pipeline, "jobs", "show", delivered_job)
    assert result.exit_code == 0, result.output
    assert f"job_id:      {delivered_job}" in result.output
    assert "status:      delivered" in result.output
    assert "delivery:    http: done attempts=1" in result.output
    # Every time is UTC and says so, the attempts' timeline's included.
    [attempt] = [line for line in result.output.splitlines() if line.startswith("  ") and " verify " in line]
    assert re.match(r"  \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ verify ", attempt), attempt
    second = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"  # to the second: no microseconds in text
    for key in ("created_at", "updated_at"):
        assert re.search(rf"^{key}:  {second}$", result.output, re.MULTILINE), result.output
    assert re.search(rf"^callback:    #\d+ at {second}: accepted$", result.output, re.MULTILINE), result.output
    # The job's input and user data, not only in --json.
    stored = pipeline.ledger.views.show_job(delivered_job).job
    assert stored is not None
    assert stored.input is not None
    where = stored.input
    assert f"input:       {where.bucket}/{where.key} ({where.region})\n" in result.output
    assert "user_data:   order-42\n" in result.output


def test_jobs_list(pipeline: Pipeline, delivered_job: str) -> None:
    table = run(pipeline, "jobs", "list")
    assert table.exit_code == 0, table.output
    assert delivered_job in table.output
    [row] = [line for line in table.output.splitlines() if line.startswith(delivered_job)]
    assert re.search(r" delivered  \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", row), row
    lines = run(pipeline, "jobs", "list", "--json", "--status", "delivered").output.splitlines()
    assert [json.loads(line)["job_id"] for line in lines] == [delivered_job]
    assert run(pipeline, "jobs", "list", "--json", "--status", "dead").output == ""


def test_replay_one_sink(pipeline: Pipeline, delivered_job: str) -> None:
    result = run(pipeline, "replay", delivered_job, "--sink", "http")
    assert result.exit_code == 0, result.output
    assert result.output == f"replay of {delivered_job} scheduled for: http\n"
    assert pipeline.drain(pipeline.worker(), delivered_job, DONE) == "delivered"
    assert len(pipeline.http.requests) == 2
    assert pipeline.http.requests[0].headers["webhook-id"] == pipeline.http.requests[1].headers["webhook-id"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("replay", "JOB", "--sink", "nope"), "Error: unknown sink 'nope'; configured: filesystem, http"),
        (("jobs", "show", "nope"), "Error: no job 'nope' in the ledger"),
        (("replay", "nope"), "Error: no job 'nope' in the ledger"),
    ],
)
def test_operator_errors(pipeline: Pipeline, delivered_job: str, args: tuple[str, ...], message: str) -> None:
    result = run(pipeline, *(delivered_job if a == "JOB" else a for a in args))
    assert result.exit_code == 1
    assert result.output.strip() == message


def test_worker_refuses_to_start_without_credentials(pipeline: Pipeline) -> None:
    result = run(pipeline, "worker", "--burst", COS_SECRET_KEY="")
    assert result.exit_code == 1
    assert result.output.strip() == "Error: configuration error: COS_SECRET_KEY is not set"


def test_worker_burst_processes_then_exits(pipeline: Pipeline) -> None:
    job_id = pipeline.submit(pipeline.upload_input())
    pipeline.wait_until(lambda: pipeline.status(job_id) == "received", what="callback")
    result = run(pipeline, "worker", "--burst")
    assert result.exit_code == 0, result.output
    assert pipeline.status(job_id) == "delivered"


# Cursor and colour escapes, and a line break that would start a row of its own.
HOSTILE = "\x1b[2J\x1b[31m\r\nj-forged    NoiseReduction   Success   delivered"


def test_text_output_shows_control_characters_escaped(ledger: Ledger) -> None:
    with serving(ledger) as url:
        assert post(url, json_doc(job("j-hostile-tag", Tag="Noise" + HOSTILE))).status_code == 200
        assert post(url, json_doc(job("j-dead"))).status_code == 200
    verification = ledger.queue.claim("w1", 60)
    assert verification is not None
    assert ledger.queue.give_up(verification.tasks[0], "w1", "CI answered" + HOSTILE)
    env = {"WEBHOOK_DATABASE_URL": ledger.url}
    shown = HOSTILE.encode("unicode_escape").decode()

    def lines(*args: str) -> list[str]:
        result = CliRunner().invoke(main, list(args), env=env)
        assert result.exit_code == 0, result.output
        assert all(line.isprintable() for line in result.output.splitlines()), repr(result.output)
        assert shown in result.output
        return result.output.splitlines()

    assert len(lines("jobs", "list")) == 3  # the header and one row per job
    for job_id in ("j-hostile-tag", "j-dead"):
        assert all(line.split(":")[0].isidentifier() for line in lines("jobs", "show", job_id))
    # JSON escapes control characters itself, and gives the values back exactly.
    listed = CliRunner().invoke(main, ["jobs", "list", "--json"], env=env).output.splitlines()
    assert {json.loads(line)["tag"] for line in listed} == {"Noise" + HOSTILE, "NoiseReduction"}
    assert len(lines("dead", "list")) == 2  # the header and the verification that gave up


def test_jobs_show_says_which_callbacks_were_capped(ledger: Ledger) -> None:
    for user_data in ("first", "second", "third"):  # three versions of one job
        detail = job("j-many")
        detail["Operation"]["UserData"] = user_data
        data = json_doc(detail)
        parsed = parse_callback(data)
        raw = RawRequest(data, "application/json", {}, "127.0.0.1")
        ledger.jobs.record(raw, parsed, triage(parsed, frozenset({"NoiseReduction"})), 2)
    env = {"WEBHOOK_DATABASE_URL": ledger.url}
    result = CliRunner().invoke(main, ["jobs", "show", "j-many"], env=env)
    assert result.exit_code == 0, result.output
    shown = [line for line in result.output.splitlines() if line.startswith("callback:")]
    assert [line.split(": ", 2)[-1] for line in shown] == [
        "pending",
        "pending",
        "capped (not verified: the job already has 2 versions, the most one job may have)",
    ]


@pytest.mark.parametrize(
    "args",
    [["jobs", "list"], ["jobs", "show", "j1"], ["dead", "list", "--json"], ["replay", "--dead"], ["worker", "--burst"]],
    ids=lambda args: " ".join(args),
)
def test_an_unreachable_ledger_is_one_line_naming_it_without_the_password(args: list[str]) -> None:
    # Port 1 on loopback: nothing listens, so the connection is refused at once.
    env = {
        "WEBHOOK_DATABASE_URL": "postgresql://hook:s3cret-pw@127.0.0.1:1/ledger",
        "COS_SECRET_ID": "id",
        "COS_SECRET_KEY": "key",
        "COS_REGION": "ap-guangzhou",
        "WEBHOOK_ALLOWED_BUCKETS": "audio-1250000000",
        "WEBHOOK_SINK_DIR": "/tmp/unused",
    }
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 2
    assert result.output == (
        "Error: the ledger at postgresql+psycopg://hook:***@127.0.0.1:1/ledger is unreachable (OperationalError)\n"
    )


def test_check_tries_token_ledger_and_ci_credentials(pipeline: Pipeline) -> None:
    good = run(pipeline, "check")
    assert good.exit_code == 0, good.output
    assert good.output.splitlines()[:3] == [
        "ok    callback token: 1 configured",
        f"ok    ledger: {pipeline.settings.database_url.split('://')[0]} is reachable and its schema is current "
        f"({head()})",
        "ok    ci: audio-1250000000 (ap-guangzhou) accepts the credentials",
    ]

    rotated = run(pipeline, "check", COS_SECRET_KEY="not-the-key", WEBHOOK_CALLBACK_TOKEN="")
    assert rotated.exit_code == 1
    lines = rotated.output.splitlines()
    assert lines[0] == "FAIL  callback token: WEBHOOK_CALLBACK_TOKEN is not set (16 to 256 URL-safe characters)"
    assert lines[2].startswith("FAIL  ci: audio-1250000000 (ap-guangzhou): CI answered 403 SignatureDoesNotMatch")


def test_check_reports_missing_tables_without_creating_them(pipeline: Pipeline) -> None:
    with pipeline.ledger.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE job_versions"))
    result = run(pipeline, "check")
    assert result.exit_code == 1
    assert "lacks tables job_versions (run cos-webhook migrate)" in result.output.splitlines()[1]
    assert "job_versions" not in sa.inspect(pipeline.ledger.engine).get_table_names()


def test_token_prints_a_fresh_token_the_receiver_accepts() -> None:
    first, second = (CliRunner().invoke(main, ["token"]) for _ in range(2))

    assert (first.exit_code, second.exit_code) == (0, 0)
    made = first.output.strip()
    assert made != second.output.strip()
    assert len(made) == 43
    Settings.from_env({"WEBHOOK_CALLBACK_TOKEN": made}).check_receiver()  # raises if it were refused


def test_an_unknown_status_is_refused_with_the_choices(pipeline: Pipeline) -> None:
    result = run(pipeline, "jobs", "list", "--status", "done")

    assert result.exit_code == 2
    assert "Invalid value for '--status': 'done' is not one of" in result.output
    assert "'received', 'verified', 'delivered', 'failed', 'rejected', 'dead', 'ignored'" in result.output
