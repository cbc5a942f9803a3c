"""Callbacks shaped as CI really sends them, end to end: the real SDK against the sandbox, on both ledgers.

The sandbox speaks the contract of Tencent's own examples (:mod:`webhook.dev.sandbox.results`):
locations left empty or out, ``Output.Object`` as submitted with the written name only in
``MediaResult``, ``Md5Info``, ``WorkflowFinish``. Each shape must be delivered with the bytes CI
wrote; what CI does not confirm must be refused with nothing fetched or forwarded.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from support.pipeline import (
    BUCKET,
    DONE,
    FAST,
    REGION,
    Pipeline,
    forged,
    multipart_file,
    multipart_files,
    pipeline_settings,
    working,
)
from support.receiver import Receiver
from support.sink_dir import written
from support.tdmq import consumer, consuming, submit_with_tdmq

from webhook.dev.sandbox import CallbackShape, Fault, Sandbox, noisy_wav
from webhook.intake.reconcile import reconcile
from webhook.ledger import Ledger, utcnow


def delivered_event(pipeline: Pipeline, job_id: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((pipeline.sink_dir / f"{job_id}.event.json").read_text())
    return event


def assert_nothing_forwarded(pipeline: Pipeline) -> None:
    assert pipeline.http.requests == []
    assert not pipeline.sink_dir.exists() or written(pipeline.sink_dir) == []


@pytest.mark.parametrize("shape", [CallbackShape.EMPTY_BUCKETS, CallbackShape.OBJECT_ONLY])
@pytest.mark.parametrize("callback_format", ["JSON", "XML"])
def test_a_callback_that_leaves_its_locations_out_is_found_and_delivered(
    pipeline: Pipeline, shape: CallbackShape, callback_format: str
) -> None:
    pipeline.sandbox.callback_shape = shape
    job_id = pipeline.submit(pipeline.upload_input(), callback_format=callback_format)
    (sent,) = pipeline.sandbox.wait_for_callbacks(1, timeout=20)
    assert f"<BucketId>{BUCKET}</BucketId>".encode() not in sent.body
    assert f'"BucketId": "{BUCKET}"'.encode() not in sent.body

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"

    data = pipeline.output_bytes()
    assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == data
    event = delivered_event(pipeline, job_id)
    # What is delivered is CI's account of the job, not the callback's gaps.
    assert event["job"]["input"] == {"bucket": BUCKET, "region": REGION, "key": "in/noisy.wav"}
    assert event["job"]["output"] == {"bucket": BUCKET, "region": REGION, "key": "out/denoised.wav"}
    assert event["file"]["md5"] == hashlib.md5(data).hexdigest()


@pytest.mark.parametrize("callback_format", ["JSON", "XML"])
def test_a_template_output_is_fetched_where_ci_wrote_it(pipeline: Pipeline, callback_format: str) -> None:
    job_id = pipeline.submit(
        pipeline.upload_input("in/take 1.wav"), output_key="out/${InputName}.${ext}", callback_format=callback_format
    )
    pipeline.sandbox.wait_for_callbacks(1, timeout=20)

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"

    data = pipeline.output_bytes("out/take 1.wav")
    assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == data
    event = delivered_event(pipeline, job_id)
    assert event["file"]["name"] == "take 1.wav"
    assert event["file"]["md5"] == hashlib.md5(data).hexdigest()
    assert event["job"]["output"]["key"] == "out/take 1.wav"
    assert event["job"]["output_files"][0]["object_names"] == ["out/take 1.wav"]
    assert event["job"]["media_info"]["sample_rate"] == "16000"
    (posted,) = pipeline.http.requests
    assert multipart_file(posted)[1] == data  # the http sink got the same bytes


def test_a_template_ci_names_no_file_for_is_dead_and_never_fetched(pipeline: Pipeline) -> None:
    pipeline.sandbox.reports_results = False  # CI reports only the name as submitted
    job_id = pipeline.submit(pipeline.upload_input(), output_key="out/${InputName}.${ext}")
    pipeline.sandbox.wait_for_callbacks(1, timeout=20)

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "dead"

    view = pipeline.ledger.views.show_job(job_id).to_dict()
    (verify,) = view["verify"]
    assert verify["last_error"] == (
        "output 'out/${InputName}.${ext}' is a template and CI names no file it wrote (CI names no file to fetch)"
    )
    assert [a["step"] for a in view["attempts"]] == ["verify"]  # one attempt, and no fetch
    assert_nothing_forwarded(pipeline)

    # Once CI reports what it wrote, replaying the job delivers it.
    pipeline.sandbox.reports_results = True
    pipeline.ledger.jobs.replay(job_id, [])
    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"
    assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == pipeline.output_bytes("out/noisy.wav")


def test_a_job_no_allowlisted_bucket_knows_is_rejected_and_nothing_fetched(pipeline: Pipeline) -> None:
    job_id = "j" + "7" * 32
    body = forged(
        job_id,
        Input={"BucketId": "", "Object": "in/noisy.wav", "Region": ""},
        Operation={"Output": {"Bucket": "", "Object": "out/denoised.wav", "Region": ""}},
    )
    assert pipeline.post_callback(body).json()["jobs"] == [{"job_id": job_id, "duplicate": False}]

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "rejected"

    view = pipeline.ledger.views.show_job(job_id).to_dict()
    assert view["reason"] == f"CI does not know job {job_id} in bucket {BUCKET}"
    assert [a["step"] for a in view["attempts"]] == ["verify"]
    assert_nothing_forwarded(pipeline)


def test_bytes_that_do_not_match_the_md5_ci_reported_are_never_forwarded(pipeline: Pipeline) -> None:
    job_id = pipeline.submit(pipeline.upload_input())
    pipeline.sandbox.wait_for_callbacks(1, timeout=20)
    reported = hashlib.md5(pipeline.output_bytes()).hexdigest()
    # The object changes after CI wrote it: COS's CRC64 matches the new bytes, CI's MD5 does not.
    replaced = b"RIFF\x00\x00\x00\x00WAVE not what CI wrote"
    pipeline.sandbox.client(REGION).put_object(Bucket=BUCKET, Key="out/denoised.wav", Body=replaced)

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "dead"

    view = pipeline.ledger.views.show_job(job_id).to_dict()
    expected = f"out/denoised.wav failed its MD5 check: CI says {reported}, got {hashlib.md5(replaced).hexdigest()}"
    assert {d["last_error"].split(" (")[0] for d in view["deliveries"]} == {expected}
    assert_nothing_forwarded(pipeline)


# -- a job that wrote several files (Output.Object with ${Number}) ----------------------------------

PARTS = ("out/noisy-1.wav", "out/noisy-2.wav")  # what the sandbox writes for the template below, in order


def submit_two_files(pipeline: Pipeline, callback_format: str = "JSON") -> str:
    """A job whose output CI writes in two parts, each named in MediaResult with its MD5."""
    pipeline.sandbox.output_parts = 2
    job_id = pipeline.submit(
        pipeline.upload_input(), output_key="out/${InputName}-${Number}.${ext}", callback_format=callback_format
    )
    pipeline.sandbox.wait_for_callbacks(1, timeout=20)
    return job_id


def staged(pipeline: Pipeline) -> list[str]:
    return sorted(path.name for path in Path(pipeline.settings.temp_dir).glob("cos-webhook-staged/*.staged"))


@pytest.mark.parametrize("callback_format", ["JSON", "XML"])
def test_a_job_that_wrote_two_files_delivers_both_to_every_sink(pipeline: Pipeline, callback_format: str) -> None:
    job_id = submit_two_files(pipeline, callback_format)
    gets = pipeline.sandbox.faults.add(Fault(kind="object GET", path="/out/noisy-*.wav", delay=0.001))  # counts

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"

    parts = [pipeline.output_bytes(key) for key in PARTS]
    names = [f"{job_id}.1.wav", f"{job_id}.2.wav"]
    assert written(pipeline.sink_dir) == [*names, f"{job_id}.event.json"]
    assert [(pipeline.sink_dir / name).read_bytes() for name in names] == parts
    event = delivered_event(pipeline, job_id)
    assert [(f["name"], f["size"], f["md5"], f["stored_as"]) for f in event["files"]] == [
        ("noisy-1.wav", len(parts[0]), hashlib.md5(parts[0]).hexdigest(), names[0]),
        ("noisy-2.wav", len(parts[1]), hashlib.md5(parts[1]).hexdigest(), names[1]),
    ]
    # v1's one file and output are the first: a receiver written for one file per job gets that one.
    assert event["file"] == {k: v for k, v in event["files"][0].items() if k != "stored_as"}
    assert event["job"]["output"]["key"] == PARTS[0]
    assert event["job"]["output_files"][0]["object_names"] == list(PARTS)
    (posted,) = pipeline.http.requests
    document, audio = multipart_files(posted)
    assert audio == tuple(parts)  # parts file and file.2: the same bytes
    assert [f["name"] for f in document["files"]] == ["noisy-1.wav", "noisy-2.wav"]
    assert "stored_as" not in document["files"][0]
    # Fetched once for both sinks, and nothing staged is left once every delivery is done.
    assert gets.fired == 2
    steps = [a["step"] for a in pipeline.ledger.views.show_job(job_id).to_dict()["attempts"]]
    assert sorted(steps) == ["deliver", "deliver", "fetch", "verify"]
    assert staged(pipeline) == []


def test_a_notification_of_a_two_file_job_says_where_each_file_is(pipeline: Pipeline) -> None:
    pipeline.settings = pipeline.settings.replace(http_sink_mode="json")
    job_id = submit_two_files(pipeline)

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"

    (posted,) = pipeline.http.requests
    event = json.loads(posted.body or b"")
    assert [f["location"] for f in event["files"]] == [
        {"kind": "source", "bucket": BUCKET, "key": key, "region": REGION} for key in PARTS
    ]
    assert [f["md5"] for f in event["files"]] == [hashlib.md5(pipeline.output_bytes(key)).hexdigest() for key in PARTS]


def test_a_second_file_that_fails_its_md5_fails_every_delivery_and_nothing_is_forwarded(pipeline: Pipeline) -> None:
    job_id = submit_two_files(pipeline)
    reported = hashlib.md5(pipeline.output_bytes(PARTS[1])).hexdigest()
    replaced = b"RIFF\x00\x00\x00\x00WAVE not what CI wrote"
    pipeline.sandbox.client(REGION).put_object(Bucket=BUCKET, Key=PARTS[1], Body=replaced)
    first_gets = pipeline.sandbox.faults.add(Fault(kind="object GET", path=f"/{PARTS[0]}", delay=0.001))  # counts

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "dead"

    view = pipeline.ledger.views.show_job(job_id).to_dict()
    expected = f"{PARTS[1]} failed its MD5 check: CI says {reported}, got {hashlib.md5(replaced).hexdigest()}"
    assert {d["last_error"].split(" (")[0] for d in view["deliveries"]} == {expected}
    # Retried on the retry policy, then dead; each try fetched again what failed (once for both
    # deliveries when they are claimed together, as they mostly are).
    steps = [a["step"] for a in view["attempts"]]
    assert steps.count("deliver") == 2 * FAST.max_attempts
    assert FAST.max_attempts <= steps.count("fetch") <= 2 * FAST.max_attempts
    assert first_gets.fired == 1  # the first file stayed staged for the retries, and went with the job
    assert staged(pipeline) == []
    assert_nothing_forwarded(pipeline)  # no event document, no part of the job, in any sink


def test_a_stated_foreign_output_bucket_is_refused_without_asking_ci(pipeline: Pipeline) -> None:
    # Asking CI would fail and be retried; a refusal proves CI was never asked.
    pipeline.sandbox.faults.add(Fault(kind="CI describe", status=503))
    job_id = "j" + "8" * 32
    foreign = {"Output": {"Bucket": "other-1250000000", "Object": "out/x.wav", "Region": REGION}}
    pipeline.post_callback(forged(job_id, Operation=foreign))

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "rejected"

    assert pipeline.ledger.views.show_job(job_id).reason == (
        "output bucket other-1250000000 is not in WEBHOOK_ALLOWED_BUCKETS"
    )
    assert [active.fired for active in pipeline.sandbox.faults.active] == [0]
    assert_nothing_forwarded(pipeline)


@pytest.mark.parametrize("callback_format", ["json", "xml"])
def test_a_workflow_callback_alone_gets_its_job_delivered(pipeline: Pipeline, callback_format: str) -> None:
    with Receiver() as elsewhere:  # the task's own callback goes somewhere else
        job_id = pipeline.submit(pipeline.upload_input(), callback_url=elsewhere.url)
        pipeline.sandbox.wait_for_callbacks(1, timeout=20)

    sent = pipeline.sandbox.finish_workflow(pipeline.callback_url, [job_id], callback_format)

    assert sent.status_code == 200
    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"
    assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == pipeline.output_bytes()
    event = delivered_event(pipeline, job_id)
    assert event["job"]["workflow"]["run_id"] == sent.job_id
    assert event["job"]["output"]["key"] == "out/denoised.wav"


@pytest.mark.parametrize("callback_format", ["JSON", "XML"])
def test_a_tdmq_callback_holding_only_the_input_object_is_delivered(
    database_url: str, sandbox: Sandbox, http_sink: Receiver, tmp_path: Path, callback_format: str
) -> None:
    sandbox.callback_shape = CallbackShape.OBJECT_ONLY
    settings = pipeline_settings(database_url, sandbox, tmp_path / "delivered", http_sink.url + "hooks")
    ledger = Ledger(database_url)
    ledger.migrate()
    noisy_wav(tmp_path / "input.wav", 0.2)
    sandbox.client(REGION).put_object(Bucket=BUCKET, Key="in/a.wav", Body=(tmp_path / "input.wav").read_bytes())
    try:
        with consuming(consumer(sandbox, ledger)), working(settings, ledger):
            job_id = submit_with_tdmq(sandbox, "in/a.wav", "out/${InputName}-clean.${ext}", callback_format)
            deadline = time.monotonic() + 30
            while ledger.views.list_jobs(limit=10) == [] or ledger.views.show_job(job_id).status != "delivered":
                assert time.monotonic() < deadline, "the job was not delivered"
                time.sleep(0.05)
    finally:
        ledger.dispose()

    written_by_ci = sandbox.object_path(BUCKET, "out/a-clean.wav").read_bytes()
    assert (tmp_path / "delivered" / f"{job_id}.wav").read_bytes() == written_by_ci
    (sent,) = sandbox.callbacks_sent
    assert sent.url.startswith("tdmq://")
    assert b"BucketId" not in sent.body


def test_reconcile_records_a_template_job_whose_callback_never_came_and_it_is_delivered(pipeline: Pipeline) -> None:
    job_id = pipeline.submit(pipeline.upload_input(), output_key="out/${InputName}.${ext}", callback_url="no")
    deadline = time.monotonic() + 20
    while (pipeline.sandbox.client(REGION).ci_get_media_jobs(Bucket=BUCKET, JobIDs=job_id))["JobsDetail"][0][
        "State"
    ] != "Success":
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.05)

    summary = reconcile(pipeline.settings, pipeline.ledger, utcnow() - timedelta(hours=1))

    assert summary.to_dict()["recorded"] == [job_id]
    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"
    assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == pipeline.output_bytes("out/noisy.wav")


def test_a_bucket_ci_says_is_not_in_the_region_asked_does_not_know_the_job(pipeline: Pipeline) -> None:
    # What COS answers for a bucket asked through another region's endpoint: not an outage to retry.
    pipeline.sandbox.faults.add(Fault(kind="CI describe", status=404, code="NoSuchBucket"))
    job_id = "j" + "9" * 32
    pipeline.post_callback(forged(job_id, Input={"Object": "in/noisy.wav"}))

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "rejected"

    assert pipeline.ledger.views.show_job(job_id).reason == f"CI does not know job {job_id} in bucket {BUCKET}"
    assert [active.fired for active in pipeline.sandbox.faults.active] == [1]
