"""Reconcile: jobs whose callback never came are found through CI's job list, recorded and delivered."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from support.pipeline import BUCKET, DONE, REGION, Pipeline, settings_env
from support.receiver import Receiver

from webhook.callback import parse_job
from webhook.cli import main
from webhook.config import ConfigError, Settings
from webhook.ledger import utcnow
from webhook.ledger.schema import callbacks
from webhook.reconcile import Listed, Summary, creation_time, reconcile, to_record

FINISHED = "Success,Failed,Cancel"


@pytest.fixture
def lost_url() -> str:
    """A callback URL nobody listens on: a receiver's, after it stopped."""
    receiver = Receiver().start()
    url = receiver.url + "callback"
    receiver.stop()
    return url


def submit_lost(pipeline: Pipeline, lost_url: str, n: int) -> list[str]:
    """``n`` jobs whose callbacks go nowhere; their ids, in the order they were submitted."""
    input_key = pipeline.upload_input(seconds=0.2)
    return [pipeline.submit(input_key, output_key=f"out/{i}.wav", callback_url=lost_url) for i in range(n)]


def wait_finished(pipeline: Pipeline, n: int) -> None:
    client = pipeline.sandbox.client(REGION)

    def finished() -> int:
        return len(
            client.ci_list_media_jobs(Bucket=BUCKET, Tag="NoiseReduction", States=FINISHED, Size=100).get(
                "JobsDetail", []
            )
        )

    pipeline.wait_until(lambda: finished() >= n, what=f"{n} finished jobs")


def run_reconcile(pipeline: Pipeline) -> dict[str, object]:
    summary: Summary = reconcile(pipeline.settings, pipeline.ledger, utcnow() - timedelta(hours=24))
    return summary.to_dict()


def cli(pipeline: Pipeline, *args: str, **env: str) -> Result:
    return CliRunner().invoke(main, ["reconcile", *args], env=settings_env(pipeline.settings) | env)


@pytest.mark.slow
def test_lost_callbacks_are_found_recorded_and_delivered_once(
    pipeline: Pipeline, lost_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = submit_lost(pipeline, lost_url, 40)
    wait_finished(pipeline, 40)
    monkeypatch.setattr("webhook.reconcile.PAGE_SIZE", 7)  # 40 jobs take six pages: NextToken is followed

    found = run_reconcile(pipeline)

    assert (found["listed"], found["already_known"], found["recorded"]) == (40, 0, ids)
    assert [pipeline.status(job_id) for job_id in ids] == ["received"] * 40
    worker = pipeline.worker()
    try:
        assert {pipeline.drain(worker, job_id, DONE) for job_id in ids} == {"delivered"}
    finally:
        worker.close()
    for i, job_id in enumerate(ids):
        assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == pipeline.output_bytes(f"out/{i}.wav")
    with pipeline.ledger.engine.connect() as conn:
        stored = conn.execute(sa.select(callbacks.c.remote_addr, callbacks.c.headers, callbacks.c.body)).all()
    assert {(addr, json.loads(headers)["X-Found-By"]) for addr, headers, _ in stored} == {("reconcile", "reconcile")}
    assert sorted(json.loads(body)["JobId"] for _, _, body in stored) == sorted(ids)
    assert all(sent.status_code is None for sent in pipeline.sandbox.callbacks_sent)

    again = run_reconcile(pipeline)

    assert (again["listed"], again["already_known"], again["recorded"]) == (40, 40, [])
    assert len(pipeline.http.requests) == 40


@pytest.mark.slow
@pytest.mark.parametrize("sandbox", [1.0], indirect=True)
def test_a_running_job_is_left_until_a_later_reconcile_finds_it_finished(pipeline: Pipeline, lost_url: str) -> None:
    [job_id] = submit_lost(pipeline, lost_url, 1)

    early = run_reconcile(pipeline)

    assert (early["listed"], early["recorded"]) == (0, [])
    assert pipeline.status(job_id) == ""

    wait_finished(pipeline, 1)
    late = run_reconcile(pipeline)

    assert late["recorded"] == [job_id]
    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"


def test_queue_ids_restrict_the_listing(pipeline: Pipeline, lost_url: str) -> None:
    [job_id] = submit_lost(pipeline, lost_url, 1)
    wait_finished(pipeline, 1)
    queue_id = pipeline.sandbox.client(REGION).ci_get_media_jobs(Bucket=BUCKET, JobIDs=job_id)["JobsDetail"][0][
        "QueueId"
    ]
    since = utcnow() - timedelta(hours=1)

    elsewhere = reconcile(pipeline.settings.replace(reconcile_queue_ids=("p" + "0" * 32,)), pipeline.ledger, since)
    mine = reconcile(pipeline.settings.replace(reconcile_queue_ids=("p" + "0" * 32, queue_id)), pipeline.ledger, since)

    assert (elsewhere.to_dict()["listed"], elsewhere.to_dict()["recorded"]) == (0, [])
    assert mine.to_dict()["recorded"] == [job_id]


def test_cli_json_summary_then_text(pipeline: Pipeline, lost_url: str) -> None:
    ids = submit_lost(pipeline, lost_url, 2)
    wait_finished(pipeline, 2)

    first = cli(pipeline, "--json", "--since", "1h")

    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary == {
        "since": summary["since"],
        "listed": 2,
        "already_known": 0,
        "recorded": ids,
        "buckets": [{"bucket": BUCKET, "region": REGION, "listed": 2, "already_known": 0, "recorded": ids}],
    }
    assert datetime.strptime(summary["since"], "%Y-%m-%dT%H:%M:%S%z") > datetime.now(UTC) - timedelta(minutes=61)

    second = cli(pipeline)

    assert second.exit_code == 0, second.output
    [line] = second.stdout.splitlines()
    assert re.fullmatch(
        rf"reconcile since \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\+0800: 2 finished jobs listed, 2 already known, "
        rf"0 recorded \({BUCKET}: 2 listed, 2 known, 0 recorded\)",
        line,
    )


def test_cli_prints_one_line_per_recorded_job_and_a_summary(pipeline: Pipeline, lost_url: str) -> None:
    [job_id] = submit_lost(pipeline, lost_url, 1)
    wait_finished(pipeline, 1)

    result = cli(pipeline, "--since", "2h")

    assert result.exit_code == 0, result.output
    recorded, summary = result.stdout.splitlines()
    assert recorded == f"recorded {job_id} ({BUCKET})"
    assert summary.endswith(
        f"1 finished jobs listed, 0 already known, 1 recorded ({BUCKET}: 1 listed, 0 known, 1 recorded)"
    )


def test_cli_wrong_secret_key_names_the_bucket_and_the_error(pipeline: Pipeline) -> None:
    result = cli(pipeline, COS_SECRET_KEY="not-the-sandbox-key")

    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"Error: bucket {BUCKET}: CI answered 403 SignatureDoesNotMatch: ")
    assert "not-the-sandbox-key" not in result.output


def test_to_record_keeps_finished_jobs_the_ledger_lacks_once_each() -> None:
    def listed(job_id: str, state: str) -> Listed:
        detail = {"JobId": job_id, "Tag": "NoiseReduction", "State": state, "Operation": {}}
        return Listed(parse_job(detail, "test"), detail)

    page = [
        listed("jnew", "Success"),
        listed("jfailed", "Failed"),
        listed("jknown", "Success"),
        listed("jrunning", "Running"),
        listed("jnew", "Success"),  # pages can overlap
        listed("jcancelled", "Cancel"),
    ]

    assert [item.job.job_id for item in to_record(page, {"jknown"})] == ["jnew", "jfailed", "jcancelled"]


def test_creation_time_is_written_as_the_api_takes_it() -> None:
    assert creation_time(datetime(2024, 5, 1, 2, 3, 4)) == "2024-05-01T10:03:04+0800"
    assert creation_time(datetime(2024, 5, 1, 23, 0, 0, tzinfo=UTC)) == "2024-05-02T07:00:00+0800"


def test_reconcile_settings_come_from_the_environment() -> None:
    settings = Settings.from_env({"WEBHOOK_RECONCILE_QUEUE_IDS": "pa1, pb2,", "WEBHOOK_RECONCILE_INTERVAL": "300"})
    defaults = Settings.from_env({})

    assert (settings.reconcile_queue_ids, settings.reconcile_interval) == (("pa1", "pb2"), 300.0)
    assert (defaults.reconcile_queue_ids, defaults.reconcile_interval) == ((), 600.0)
    with pytest.raises(ConfigError, match="WEBHOOK_RECONCILE_INTERVAL must be greater than 0"):
        Settings.from_env({"WEBHOOK_RECONCILE_INTERVAL": "0"})
