"""``submit`` and ``queue show|register``, run as an operator would against the sandbox and a live receiver."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from qcloud_cos import CosServiceError
from support.pipeline import BUCKET, REGION, TOKEN, Pipeline, settings_env, working
from support.receiver import Reply
from support.tdmq import QUEUE, consumer, consuming, tdmq_env

from webhook.ci.queue import list_queues
from webhook.ci.submit import SubmitError, choose_bucket, submit_noise_reduction
from webhook.cli import main
from webhook.config import Settings
from webhook.dev.sandbox import noisy_wav
from webhook.dev.sandbox.submission import new_job
from webhook.models import ObjectLocation

QUICK = ("--interval", "0.05", "--timeout", "60")


def run(pipeline: Pipeline, *args: str, **env: str | None) -> Result:
    """The command with the pipeline's settings and this service's public URL (the receiver)."""
    full_env: dict[str, str | None] = {**settings_env(pipeline.settings), "WEBHOOK_PUBLIC_URL": pipeline.receiver_url}
    return CliRunner().invoke(main, list(args), env=full_env | env)


def listed_jobs(pipeline: Pipeline) -> list[dict[str, Any]]:
    answer = pipeline.sandbox.client(REGION).ci_list_media_jobs(Bucket=BUCKET, Tag="NoiseReduction")
    jobs: list[dict[str, Any]] = answer.get("JobsDetail", [])
    return jobs


def queue_notify(pipeline: Pipeline) -> dict[str, Any]:
    notify: dict[str, Any] = pipeline.sandbox.client(REGION).ci_get_asr_queue(Bucket=BUCKET)["QueueList"][0][
        "NotifyConfig"
    ]
    return notify


# --- submit ----------------------------------------------------------------------------------


def test_a_local_file_is_uploaded_and_the_job_waited_for_until_delivered(pipeline: Pipeline, tmp_path: Path) -> None:
    source = noisy_wav(tmp_path / "meeting.wav", 0.5)
    with working(pipeline.settings, pipeline.ledger):
        result = run(pipeline, "submit", str(source), "--output", "out/meeting.wav", "--wait", *QUICK)
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    assert result.stdout == f"{job_id}\n"  # stdout is the JobId alone; progress went to stderr
    assert f"uploaded {source} to {BUCKET}/input/meeting.wav" in result.stderr
    assert f"{job_id}: delivered" in result.stderr
    assert pipeline.sandbox.object_path(BUCKET, "input/meeting.wav").read_bytes() == source.read_bytes()
    [sent] = pipeline.sandbox.callbacks_sent
    assert (sent.job_id, sent.url, sent.format, sent.status_code) == (
        job_id,
        f"{pipeline.receiver_url}/callback/{TOKEN}",
        "json",
        200,
    )
    view = pipeline.ledger.views.show_job(job_id)
    assert (view.status, view.state) == ("delivered", "Success")
    assert view.job is not None
    assert view.job.input is not None
    assert view.job.input.key == "input/meeting.wav"
    delivered = pipeline.sink_dir / f"{job_id}.wav"
    assert delivered.read_bytes() == pipeline.output_bytes("out/meeting.wav")


def test_the_output_may_be_a_template_ci_resolves(pipeline: Pipeline, tmp_path: Path) -> None:
    source = noisy_wav(tmp_path / "standup.wav", 0.5)
    with working(pipeline.settings, pipeline.ledger):
        result = run(pipeline, "submit", str(source), "--output", "clean/${InputName}.${ext}", "--wait", *QUICK)
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    assert f"{job_id}: delivered" in result.stderr
    delivered = pipeline.sink_dir / f"{job_id}.wav"
    assert delivered.read_bytes() == pipeline.output_bytes("clean/standup.wav")


def test_an_existing_key_is_submitted_as_it_is(pipeline: Pipeline) -> None:
    key = pipeline.upload_input("in/already-there.wav")
    result = run(pipeline, "submit", key, "--output", "out/x.wav", "--format", "XML", "--user-data", "order-7")
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    assert "uploaded" not in result.output
    [sent] = pipeline.sandbox.wait_for_callbacks(1, timeout=20)
    assert (sent.job_id, sent.format) == (job_id, "xml")
    [listed] = listed_jobs(pipeline)
    assert (listed["JobId"], listed["Input"]["Object"], listed["Operation"]["UserData"]) == (
        job_id,
        "in/already-there.wav",
        "order-7",
    )
    assert pipeline.drain(pipeline.worker(), job_id, {"delivered", "rejected", "dead"}) == "delivered"


def test_neither_a_file_nor_an_object_submits_nothing(pipeline: Pipeline) -> None:
    result = run(pipeline, "submit", "in/typo.wav", "--output", "out/x.wav")
    assert result.exit_code == 1
    assert f"Error: in/typo.wav is neither a local file nor an object in {BUCKET}" in result.output
    assert listed_jobs(pipeline) == []


def test_without_a_public_url_nothing_is_uploaded_or_submitted(pipeline: Pipeline, tmp_path: Path) -> None:
    source = noisy_wav(tmp_path / "meeting.wav", 0.2)
    result = run(pipeline, "submit", str(source), "--output", "out/x.wav", WEBHOOK_PUBLIC_URL=None)
    assert result.exit_code == 1
    assert "Error: WEBHOOK_PUBLIC_URL is not set" in result.output
    assert result.stdout == ""
    assert listed_jobs(pipeline) == []
    assert not pipeline.sandbox.object_path(BUCKET, "input/meeting.wav").exists()

    registered = run(pipeline, "queue", "register", WEBHOOK_PUBLIC_URL=None)
    assert registered.exit_code == 1
    assert "Error: WEBHOOK_PUBLIC_URL is not set" in registered.output
    assert queue_notify(pipeline)["State"] == "Off"


def test_wait_stops_at_a_dead_delivery_with_its_error(pipeline: Pipeline) -> None:
    pipeline.http.reply(Reply(400))  # the http sink refuses: dead at once, no retry
    key = pipeline.upload_input()
    with working(pipeline.settings, pipeline.ledger):
        result = run(pipeline, "submit", key, "--output", "out/x.wav", "--wait", *QUICK)
    assert result.exit_code == 1, result.output
    job_id = result.stdout.strip()
    assert f"Error: job {job_id} stopped at dead: " in result.stderr
    assert "http: HTTP 400" in result.stderr
    assert pipeline.ledger.views.show_job(job_id).status == "dead"


def test_wait_exits_3_for_a_job_ci_reports_failed(pipeline: Pipeline) -> None:
    pipeline.sandbox.client(REGION).put_object(Bucket=BUCKET, Body=b"not audio", Key="in/notes.wav")
    with working(pipeline.settings, pipeline.ledger):
        result = run(pipeline, "submit", "in/notes.wav", "--output", "out/x.wav", "--wait", *QUICK)
    assert result.exit_code == 3, result.output
    job_id = result.stdout.strip()
    view = pipeline.ledger.views.show_job(job_id)
    assert (view.status, view.state) == ("failed", "Failed")
    assert view.reason.startswith("CI reports Failed (InvalidInputFile: ")
    assert f"Error: job {job_id} failed: {view.reason}; its failure event was delivered" in result.stderr


def test_wait_stops_at_a_rejected_job_with_the_reason(pipeline: Pipeline) -> None:
    key = pipeline.upload_input()
    elsewhere = pipeline.settings.replace(allowed_regions=frozenset({"ap-shanghai"}))
    with working(elsewhere, pipeline.ledger):
        result = run(pipeline, "submit", key, "--output", "out/x.wav", "--wait", *QUICK)
    assert result.exit_code == 1, result.output
    job_id = result.stdout.strip()
    view = pipeline.ledger.views.show_job(job_id)
    assert view.status == "rejected"
    assert f"Error: job {job_id} stopped at rejected: {view.reason}" in result.stderr
    assert "region ap-guangzhou" in view.reason


@pytest.mark.slow  # waits out its timeout of a second
def test_wait_gives_up_after_the_timeout_and_says_where_the_job_was(pipeline: Pipeline) -> None:
    key = pipeline.upload_input()
    # No worker runs: the callback is recorded, and the job stays received.
    result = run(pipeline, "submit", key, "--output", "out/x.wav", "--wait", "--interval", "0.05", "--timeout", "1")
    assert result.exit_code == 1
    job_id = result.stdout.strip()
    assert f"Error: stopped waiting after 1 s: job {job_id}: " in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.endswith(("still received", "no callback for it reached the ledger")), last


def test_wait_refuses_a_ledger_without_tables_before_submitting(pipeline: Pipeline, tmp_path: Path) -> None:
    key = pipeline.upload_input()
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    result = run(pipeline, "submit", key, "--output", "out/x.wav", "--wait", WEBHOOK_DATABASE_URL=empty)
    assert result.exit_code == 2
    assert "Error: the ledger at sqlite:///" in result.stderr
    assert listed_jobs(pipeline) == []


def test_a_template_is_sent_as_its_id(pipeline: Pipeline) -> None:
    key = pipeline.upload_input()
    result = run(pipeline, "submit", key, "--output", "out/x.wav", "--template-id", "t1a2b3c4")
    # The sandbox keeps no templates, so it refuses the id it was given, as CI refuses an unknown one.
    assert result.exit_code == 1
    assert "CI answered 400 InvalidArgument: TemplateId 't1a2b3c4' does not exist" in result.output
    assert listed_jobs(pipeline) == []


def test_the_bucket_defaults_to_the_only_allowlisted_one() -> None:
    one = Settings(allowed_buckets=frozenset({"a-1250000000"}))
    two = Settings(allowed_buckets=frozenset({"a-1250000000", "b-1250000000"}))
    assert choose_bucket(one, None) == "a-1250000000"
    assert choose_bucket(two, "b-1250000000") == "b-1250000000"
    with pytest.raises(SubmitError, match=r"give --bucket: WEBHOOK_ALLOWED_BUCKETS names 2 buckets"):
        choose_bucket(two, None)
    with pytest.raises(SubmitError, match=r"set WEBHOOK_ALLOWED_BUCKETS"):
        choose_bucket(Settings(), None)
    with pytest.raises(SubmitError, match=r"c-1250000000 is not in WEBHOOK_ALLOWED_BUCKETS"):
        choose_bucket(one, "c-1250000000")


# --- queue show / register -------------------------------------------------------------------


def test_queue_show_prints_the_queue_and_its_notification(pipeline: Pipeline) -> None:
    [queue] = pipeline.sandbox.client(REGION).ci_get_asr_queue(Bucket=BUCKET)["QueueList"]
    result = run(pipeline, "queue", "show")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"{queue['QueueId']}  Active  {queue['Name']}",
        "  notify: State=Off Type=Url Event=TaskFinish ResultFormat=XML",
    ]
    shown = json.loads(run(pipeline, "queue", "show", "--json").output)
    assert shown == {
        "bucket": BUCKET,
        "queue_id": queue["QueueId"],
        "name": queue["Name"],
        "state": "Active",
        "notify": {"Url": "", "Event": "TaskFinish", "Type": "Url", "State": "Off", "ResultFormat": "XML"},
    }


def test_queue_register_makes_jobs_without_a_callback_come_here(pipeline: Pipeline) -> None:
    key = pipeline.upload_input()
    client = pipeline.sandbox.client(REGION)
    # Before: a job without CallBack has nowhere to call back.
    silent = submit_noise_reduction(client, key, ObjectLocation(BUCKET, REGION, "out/silent.wav"), "", None)

    result = run(pipeline, "queue", "register", "--format", "XML")
    assert result.exit_code == 0, result.output
    [queue] = client.ci_get_asr_queue(Bucket=BUCKET)["QueueList"]
    assert (queue["Name"], queue["State"]) == ("speeching-queue", "Active")  # kept as they were
    assert queue["NotifyConfig"] == {
        "Url": f"{pipeline.receiver_url}/callback/{TOKEN}",
        "Event": "TaskFinish",
        "Type": "Url",
        "State": "On",
        "ResultFormat": "XML",
    }
    assert result.output.splitlines() == [
        f"queue {queue['QueueId']} of {BUCKET} now calls back here",
        f"  notify: State=On Url={pipeline.receiver_url}/callback/<WEBHOOK_CALLBACK_TOKEN> Type=Url "
        "Event=TaskFinish ResultFormat=XML",
        "  was:    State=Off Type=Url Event=TaskFinish ResultFormat=XML",
    ]
    assert TOKEN not in result.output
    shown = run(pipeline, "queue", "show")
    assert shown.output.splitlines()[1].endswith("(calls back here)")

    with working(pipeline.settings, pipeline.ledger):
        waited = run(pipeline, "submit", key, "--output", "out/q.wav", "--callback", "queue", "--wait", *QUICK)
    assert waited.exit_code == 0, waited.output
    job_id = waited.stdout.strip()
    [sent] = pipeline.sandbox.callbacks_sent
    assert (sent.job_id, sent.url, sent.format, sent.status_code) == (
        job_id,
        f"{pipeline.receiver_url}/callback/{TOKEN}",
        "xml",
        200,
    )
    assert silent != job_id
    assert pipeline.ledger.views.show_job(job_id).status == "delivered"


def test_queue_register_names_a_queue_that_does_not_exist(pipeline: Pipeline) -> None:
    result = run(pipeline, "queue", "register", "--queue-id", "p" + "0" * 32)
    assert result.exit_code == 1
    assert f"Error: bucket {BUCKET} has no Speeching queue p{'0' * 32}" in result.output


# --- the sandbox's queue API -----------------------------------------------------------------


def test_the_sandbox_queue_answers_as_ci_documents(pipeline: Pipeline) -> None:
    client = pipeline.sandbox.client(REGION)
    [queue] = list_queues(client, BUCKET)
    assert re.fullmatch(r"p[0-9a-f]{32}", queue.queue_id)
    assert list_queues(client, "other-1250000000")[0].queue_id != queue.queue_id  # one queue per bucket
    answer = client.ci_get_asr_queue(Bucket=BUCKET, QueueIds=f"{queue.queue_id},pmissing")
    assert answer["NonExistPIDs"] == "pmissing"
    assert client.ci_get_asr_queue(Bucket=BUCKET, State="Paused")["TotalCount"] == "0"

    def refused(request: dict[str, Any], queue_id: str = queue.queue_id) -> tuple[int, str]:
        with pytest.raises(CosServiceError) as info:
            client.ci_update_asr_queue(Bucket=BUCKET, QueueId=queue_id, Request=request)
        return info.value.get_status_code(), info.value.get_error_code()

    on = {"State": "On", "Url": "http://127.0.0.1:9/", "Type": "Url", "Event": "TaskFinish"}
    good = {"Name": "q", "State": "Active", "NotifyConfig": on}
    assert refused({"Name": "q", "State": "Active"}) == (400, "InvalidArgument")  # NotifyConfig is required
    assert refused(good | {"Name": ""}) == (400, "InvalidArgument")
    assert refused(good | {"State": "Paused"}) == (501, "NotImplemented")
    assert refused(good | {"NotifyConfig": on | {"Type": "TDMQ"}}) == (400, "InvalidArgument")  # no MqName
    topic = {"Type": "TDMQ", "MqRegion": "gz", "MqMode": "Topic", "MqName": "t"}
    assert refused(good | {"NotifyConfig": on | topic}) == (400, "InvalidArgument")  # the sandbox has no topics
    assert refused(good | {"NotifyConfig": on | {"Url": "ftp://x"}}) == (400, "InvalidArgument")
    assert refused(good | {"NotifyConfig": on | {"Event": "JobDone"}}) == (400, "InvalidArgument")
    assert refused(good, "p" + "0" * 32) == (400, "InvalidArgument")
    assert list_queues(client, BUCKET)[0].notify["State"] == "Off"  # nothing refused changed it


def test_objects_under_asrqueue_are_still_objects(pipeline: Pipeline) -> None:
    client = pipeline.sandbox.client(REGION)
    client.put_object(Bucket=BUCKET, Key="asrqueue/notes.txt", Body=b"kept")
    body = client.get_object(Bucket=BUCKET, Key="asrqueue/notes.txt")["Body"].get_raw_stream().read()
    assert body == b"kept"


def test_a_job_s_own_callback_settings_win_over_the_queue() -> None:
    queue = ("http://queue.example/cb", "JSON")

    def request(**extra: str) -> bytes:
        fields = "".join(f"<{name}>{value}</{name}>" for name, value in extra.items())
        return (
            "<Request><Tag>NoiseReduction</Tag><Input><Object>in.wav</Object></Input><Operation><Output>"
            f"<Region>{REGION}</Region><Bucket>{BUCKET}</Bucket><Object>out.wav</Object></Output></Operation>"
            f"{fields}</Request>"
        ).encode()

    def target(body: bytes) -> tuple[str, str]:
        job = new_job(body, bucket=BUCKET, region=REGION, queue_id="p1", queue_notify=queue)
        return job.callback_url, job.callback_format

    assert target(request()) == ("http://queue.example/cb", "json")
    assert target(request(CallBackFormat="XML")) == ("http://queue.example/cb", "xml")
    assert target(request(CallBack="http://job.example/cb")) == ("http://job.example/cb", "xml")
    assert target(request(CallBack="no")) == ("", "xml")  # "no": not even the queue's


# --- through TDMQ ------------------------------------------------------------------------------


def test_submit_with_callback_type_tdmq_needs_no_public_url(pipeline: Pipeline) -> None:
    key = pipeline.upload_input()
    env = tdmq_env(pipeline.sandbox) | {"WEBHOOK_PUBLIC_URL": None}
    with working(pipeline.settings, pipeline.ledger), consuming(consumer(pipeline.sandbox, pipeline.ledger)):
        waited = run(
            pipeline, "submit", key, "--output", "out/t.wav", "--callback-type", "tdmq", "--wait", *QUICK, **env
        )
    assert waited.exit_code == 0, waited.output
    job_id = waited.stdout.strip()
    [sent] = pipeline.sandbox.callbacks_sent
    assert (sent.job_id, sent.url, sent.format) == (job_id, f"tdmq://gz/{QUEUE}", "json")
    assert [r.remote_addr for r in pipeline.ledger.views.raw_callbacks(job_id)] == ["tdmq"]
    assert pipeline.ledger.views.show_job(job_id).status == "delivered"

    both = run(pipeline, "submit", key, "--output", "o.wav", "--callback", "queue", "--callback-type", "tdmq", **env)
    assert both.exit_code == 2
    assert "with --callback queue the queue's decides" in both.output
    no_region = run(
        pipeline, "submit", key, "--output", "o.wav", "--callback-type", "tdmq", **env | {"WEBHOOK_TDMQ_REGION": None}
    )
    assert no_region.exit_code == 1
    assert "WEBHOOK_TDMQ_REGION is not set" in no_region.output
    assert len(listed_jobs(pipeline)) == 1  # neither was submitted


def test_queue_register_tdmq_makes_every_job_call_back_through_the_queue(pipeline: Pipeline) -> None:
    env = tdmq_env(pipeline.sandbox)
    result = run(pipeline, "queue", "register", "--tdmq", QUEUE, **env)
    assert result.exit_code == 0, result.output
    [queue] = pipeline.sandbox.client(REGION).ci_get_asr_queue(Bucket=BUCKET)["QueueList"]
    assert result.output.splitlines() == [
        f"queue {queue['QueueId']} of {BUCKET} now calls back here through TDMQ queue {QUEUE}",
        f"  notify: State=On Type=TDMQ Event=TaskFinish ResultFormat=JSON MqMode=Queue MqName={QUEUE} MqRegion=gz",
        "  was:    State=Off Type=Url Event=TaskFinish ResultFormat=XML",
    ]
    notify = queue_notify(pipeline)
    assert {name: notify[name] for name in ("State", "Type", "MqRegion", "MqMode", "MqName")} == {
        "State": "On",
        "Type": "TDMQ",
        "MqRegion": "gz",
        "MqMode": "Queue",
        "MqName": QUEUE,
    }
    assert run(pipeline, "queue", "show", **env).output.splitlines()[1].endswith("(calls back here, through TDMQ)")
    assert not run(pipeline, "queue", "show").output.splitlines()[1].endswith(")")  # another consumer's queue

    key = pipeline.upload_input()
    with working(pipeline.settings, pipeline.ledger), consuming(consumer(pipeline.sandbox, pipeline.ledger)):
        waited = run(pipeline, "submit", key, "--output", "out/q.wav", "--callback", "queue", "--wait", *QUICK, **env)
    assert waited.exit_code == 0, waited.output
    [sent] = pipeline.sandbox.callbacks_sent
    assert (sent.job_id, sent.url) == (waited.stdout.strip(), f"tdmq://gz/{QUEUE}")
