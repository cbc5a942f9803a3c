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
from support.pipeline import BUCKET, DONE, REGION, Pipeline, forged, multipart_file, pipeline_settings, working
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
