"""End to end through the real SDK and the sandbox: callback → ledger → verify → fetch → sinks."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from standardwebhooks.webhooks import Webhook
from support.pipeline import BUCKET, DONE, HTTP_SECRET, REGION, Pipeline, forged, multipart_file, run_one
from support.receiver import Receiver, Reply
from support.sandbox_jobs import held_jobs
from support.sink_dir import written

from webhook.ledger import utcnow
from webhook.models import Event
from webhook.retry import RetryPolicy
from webhook.sinks import Sink
from webhook.sinks.events import event_id
from webhook.worker.runtime import Worker


def stored(pipeline: Pipeline, job_id: str) -> None:
    pipeline.wait_until(lambda: pipeline.status(job_id) == "received", what=f"callback for {job_id}")


@pytest.mark.parametrize("callback_format", ["JSON", "XML"])
def test_round_trip_delivers_identical_bytes_to_every_sink(pipeline: Pipeline, callback_format: str) -> None:
    job_id = pipeline.submit(pipeline.upload_input(), callback_format=callback_format)
    sent = pipeline.sandbox.wait_for_callbacks(1, timeout=20)[0]
    assert (sent.format.upper(), sent.status_code) == (callback_format, 200)

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"

    expected = pipeline.output_bytes()
    assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == expected
    metadata = json.loads((pipeline.sink_dir / f"{job_id}.event.json").read_text())
    assert metadata["type"] == "job.succeeded"
    assert metadata["job"]["user_data"] == "order-42"
    assert metadata["file"]["size"] == len(expected)

    (request,) = pipeline.http.requests
    with request.open_body() as body:
        Webhook(HTTP_SECRET).verify(body.read(), request.headers, json_parse=False)
    assert request.headers["webhook-id"] == event_id(job_id, "http")
    http_metadata, audio = multipart_file(request)
    assert audio == expected
    assert http_metadata["event_id"] == event_id(job_id, "http")
    assert http_metadata["job"] == metadata["job"]

    view = pipeline.ledger.views.show_job(job_id).to_dict()
    assert [(d["sink"], d["status"], d["attempts"]) for d in view["deliveries"]] == [
        ("filesystem", "done", 1),
        ("http", "done", 1),
    ]


def test_json_http_sink_points_at_a_presigned_download(pipeline: Pipeline, tmp_path: Path) -> None:
    # Beside the environment's multipart sink (on /hooks), a json one as the configuration file declares it.
    config = tmp_path / "cos-webhook.toml"
    url = f"{pipeline.http.url}notify"
    config.write_text(
        f'[[sinks]]\nname = "notify"\ntype = "http"\n'
        f'options = {{ url = "{url}", secret_env = "WEBHOOK_HTTP_SINK_SECRET", presign_seconds = 600 }}\n'
    )
    job_id, status = pipeline.run_job(config)
    assert status == "delivered"

    expected = pipeline.output_bytes()
    requests_by_path = {request.path: request for request in pipeline.http.requests}
    assert sorted(requests_by_path) == ["/hooks", "/notify"]
    assert multipart_file(requests_by_path["/hooks"])[1] == expected  # multipart still pushes the bytes
    notified = requests_by_path["/notify"]
    assert notified.headers["content-type"] == "application/json"
    assert notified.body is not None
    document = Webhook(HTTP_SECRET).verify(notified.body, notified.headers)
    assert notified.headers["webhook-id"] == document["event_id"] == event_id(job_id, "notify")
    assert (document["type"], document["file"]["size"]) == ("job.succeeded", len(expected))
    location = document["file"]["location"]
    assert {k: v for k, v in location.items() if k != "url"} == {
        "kind": "source",
        "bucket": BUCKET,
        "key": "out/denoised.wav",
        "region": REGION,
    }
    assert location["url"].startswith(f"https://{BUCKET}.cos.{REGION}.myqcloud.com/out/denoised.wav?")
    target, headers = pipeline.sandbox.request_target(location["url"])
    download = requests.get(target, headers=headers, timeout=10)
    assert (download.status_code, download.content) == (200, expected)


def test_json_http_sink_from_the_environment_without_presigning(pipeline: Pipeline) -> None:
    # No sink needs the bytes: the worker only describes the output object.
    pipeline.settings = pipeline.settings.replace(http_sink_mode="json", sink_dir="")
    job_id = pipeline.submit(pipeline.upload_input())

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"
    (request,) = pipeline.http.requests
    assert request.headers["content-type"] == "application/json"
    assert request.body is not None
    document = Webhook(HTTP_SECRET).verify(request.body, request.headers)
    assert document["event_id"] == event_id(job_id, "http")
    assert document["file"]["size"] == len(pipeline.output_bytes())
    assert document["file"]["location"] == {
        "kind": "source",
        "bucket": BUCKET,
        "key": "out/denoised.wav",
        "region": REGION,
    }


def test_output_key_ending_in_json_is_delivered_beside_its_metadata(pipeline: Pipeline) -> None:
    key = "out/denoised.json"
    job_id = pipeline.submit(pipeline.upload_input(), output_key=key)

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"

    assert written(pipeline.sink_dir) == [f"{job_id}.event.json", f"{job_id}.json"]
    audio = (pipeline.sink_dir / f"{job_id}.json").read_bytes()
    assert audio == pipeline.output_bytes(key)
    metadata = json.loads((pipeline.sink_dir / f"{job_id}.event.json").read_text())
    assert (metadata["type"], metadata["job"]["output"]["key"]) == ("job.succeeded", key)
    assert metadata["file"]["size"] == len(audio)


def test_duplicate_callback_is_processed_once(pipeline: Pipeline) -> None:
    job_id = pipeline.submit(pipeline.upload_input())
    original = pipeline.sandbox.wait_for_callbacks(1, timeout=20)[0].body
    again = pipeline.post_callback(original)
    assert again.status_code == 200
    assert again.json()["duplicate"] is True

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"
    assert len(pipeline.http.requests) == 1
    assert written(pipeline.sink_dir) == [f"{job_id}.event.json", f"{job_id}.wav"]


def test_unknown_job_is_rejected_and_never_forwarded(pipeline: Pipeline) -> None:
    job_id = "j" + uuid.uuid4().hex
    assert pipeline.post_callback(forged(job_id)).status_code == 200

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "rejected"
    assert pipeline.ledger.views.show_job(job_id).reason == f"CI does not know job {job_id} in bucket {BUCKET}"
    assert pipeline.http.requests == []
    assert not pipeline.sink_dir.exists() or written(pipeline.sink_dir) == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"output_key": "out/elsewhere.wav"},
            f"output differs: callback says '{BUCKET}/out/elsewhere.wav in {REGION}', "
            f"CI says '{BUCKET}/out/denoised.wav in {REGION}'",
        ),
        ({"State": "Failed"}, "state differs: callback says 'Failed', CI says 'Success'"),
    ],
    ids=["output-key", "state"],
)
def test_genuine_job_with_altered_fields_is_rejected(pipeline: Pipeline, change: dict[str, str], reason: str) -> None:
    with Receiver() as elsewhere:
        job_id = pipeline.submit(pipeline.upload_input(), callback_url=elsewhere.url)
        pipeline.sandbox.wait_for_callbacks(1, timeout=20)
    assert pipeline.post_callback(forged(job_id, **change)).status_code == 200

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "rejected"
    assert pipeline.ledger.views.show_job(job_id).reason == reason
    assert pipeline.http.requests == []


def test_failed_job_is_forwarded_as_a_failure_event_without_fetching(pipeline: Pipeline) -> None:
    job_id = pipeline.submit("in/missing.wav")
    assert pipeline.drain(pipeline.worker(), job_id, DONE, timeout=30) == "failed"

    view = pipeline.ledger.views.show_job(job_id)
    assert view.state == "Failed"
    assert view.reason == "CI reports Failed (InputObjectNotExist: the input object 'in/missing.wav' does not exist)"
    assert [job.job_id for job in pipeline.ledger.views.list_jobs(status="failed")] == [job_id]
    assert pipeline.ledger.stats.snapshot().jobs["failed"] == 1
    assert written(pipeline.sink_dir) == [f"{job_id}.event.json"]
    metadata, audio = multipart_file(pipeline.http.requests[0])
    assert (metadata["type"], metadata["file"], audio) == ("job.failed", None, None)
    assert metadata["job"]["state"] == "Failed"


def test_job_ci_still_reports_running_is_checked_again(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    with Receiver() as elsewhere, held_jobs(monkeypatch) as gate:
        job_id = pipeline.submit(pipeline.upload_input(), callback_url=elsewhere.url)
        gate.wait_entered()  # CI reports the job Running until the gate opens
        # A callback that runs ahead of CI: verification must wait, not trust it.
        assert pipeline.post_callback(forged(job_id)).status_code == 200
        worker = pipeline.worker()
        assert run_one(worker)
        view = pipeline.ledger.views.show_job(job_id).to_dict()
        assert view["status"] == "received"
        assert view["verify"][0]["last_error"] == "CI reports the job Running"
        assert pipeline.http.requests == []
        gate.release()
        pipeline.sandbox.wait_for_callbacks(1, timeout=20)

    assert pipeline.drain(worker, job_id, DONE) == "delivered"
    assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == pipeline.output_bytes()


def test_sink_failures_are_retried_on_their_own(pipeline: Pipeline) -> None:
    pipeline.http.reply(Reply(503, retry_after="0"), Reply(429, retry_after="0"), Reply(200))
    job_id = pipeline.submit(pipeline.upload_input())

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"
    view = pipeline.ledger.views.show_job(job_id).to_dict()
    assert [(d["sink"], d["attempts"]) for d in view["deliveries"]] == [("filesystem", 1), ("http", 3)]
    ids = {r.headers["webhook-id"] for r in pipeline.http.requests}
    assert ids == {event_id(job_id, "http")}  # one idempotency key across all attempts


def test_a_sinks_retry_after_sets_the_time_of_the_next_attempt(pipeline: Pipeline) -> None:
    # Backoff of at most 10 ms: a next attempt ten minutes away can only be the receiver's asking.
    patient = RetryPolicy(max_attempts=4, backoff_base=0.01, backoff_cap=3600)
    worker = Worker.from_settings(pipeline.settings.replace(retry=patient), pipeline.ledger)
    pipeline.http.reply(Reply(503, retry_after="600"))
    job_id = pipeline.submit(pipeline.upload_input())
    stored(pipeline, job_id)

    before = utcnow()
    assert run_one(worker)  # verified, delivered to the filesystem, refused by the http receiver

    http = next(t for t in pipeline.ledger.views.show_job(job_id).tasks if t.sink == "http")
    assert (http.status, http.attempts, http.last_error) == ("pending", 1, "http: HTTP 503 Service Unavailable")
    assert http.run_after is not None
    assert http.run_after >= before + timedelta(seconds=600)
    assert not run_one(worker)  # nothing due before then
    assert len(pipeline.http.requests) == 1


class Leaky(Sink):
    """A sink with a bug: its exception's message carries the COS secret key."""

    def __init__(self, name: str, secret: str) -> None:
        self.name, self.secret = name, secret

    def deliver(self, event: Event) -> None:
        raise RuntimeError(f"signing with {self.secret} went wrong")


def test_an_unexpected_errors_secrets_never_reach_the_ledger(pipeline: Pipeline) -> None:
    secret = pipeline.settings.secret_key
    worker = pipeline.worker()
    worker.sinks["http"] = Leaky("http", secret)
    job_id = pipeline.submit(pipeline.upload_input())
    stored(pipeline, job_id)

    assert run_one(worker)

    view = pipeline.ledger.views.show_job(job_id)
    http = next(t for t in view.tasks if t.sink == "http")
    assert http.last_error == "RuntimeError: signing with [redacted] went wrong"
    (attempt,) = (a for a in view.attempts if a.sink == "http")
    assert (attempt.code, attempt.error) == ("RuntimeError", http.last_error)
    assert secret not in json.dumps(view.to_dict())


def test_permanent_refusal_is_dead_then_replayed(pipeline: Pipeline) -> None:
    pipeline.http.reply(Reply(400))
    job_id = pipeline.submit(pipeline.upload_input())

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "dead"
    view = pipeline.ledger.views.show_job(job_id).to_dict()
    assert [(d["sink"], d["status"]) for d in view["deliveries"]] == [("filesystem", "done"), ("http", "dead")]
    assert view["deliveries"][1]["last_error"] == "http: HTTP 400 Bad Request (refused permanently)"
    assert view["reason"] == "dead deliveries: http: HTTP 400 Bad Request (refused permanently)"
    assert (pipeline.sink_dir / f"{job_id}.wav").exists()

    pipeline.http.reply(Reply(200))
    assert pipeline.ledger.jobs.replay(job_id, ["http"]).sinks == ("http",)
    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"
    _, audio = multipart_file(pipeline.http.requests[-1])
    assert audio == pipeline.output_bytes()


def test_corrupt_object_is_retried_and_never_forwarded(pipeline: Pipeline) -> None:
    job_id = pipeline.submit(pipeline.upload_input())
    stored(pipeline, job_id)
    on_disk = pipeline.sandbox.object_path(BUCKET, "out/denoised.wav")
    good = on_disk.read_bytes()
    # Same length, different bytes: only the CRC64 can tell.
    on_disk.write_bytes(good[:100] + bytes(b ^ 0xFF for b in good[100:200]) + good[200:])

    worker = pipeline.worker()
    assert run_one(worker)  # verified, then the fetch fails its check
    view = pipeline.ledger.views.show_job(job_id).to_dict()
    assert view["status"] == "verified"
    assert all("failed its CRC64 check" in d["last_error"] for d in view["deliveries"])
    assert pipeline.http.requests == []
    assert not (pipeline.sink_dir / f"{job_id}.wav").exists()

    on_disk.write_bytes(good)
    assert pipeline.drain(worker, job_id, DONE) == "delivered"
    assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == good


def test_forgery_first_cannot_shadow_the_genuine_callback(pipeline: Pipeline) -> None:
    with Receiver() as elsewhere:
        job_id = pipeline.submit(pipeline.upload_input(), callback_url=elsewhere.url)
        genuine = pipeline.sandbox.wait_for_callbacks(1, timeout=20)[0].body
    assert pipeline.post_callback(forged(job_id, output_key="out/stolen.wav")).status_code == 200
    worker = pipeline.worker()
    assert pipeline.drain(worker, job_id, DONE) == "rejected"

    answer = pipeline.post_callback(genuine)
    assert answer.json()["jobs"] == [{"job_id": job_id, "duplicate": False}]
    assert pipeline.drain(worker, job_id, DONE) == "delivered"
    assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == pipeline.output_bytes()
    # The same forgery again is now just a duplicate of a delivered job.
    assert pipeline.post_callback(forged(job_id, output_key="out/stolen.wav")).json()["duplicate"] is True
