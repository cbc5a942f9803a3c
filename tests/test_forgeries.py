"""Forged callbacks: each is refused before anything is fetched or forwarded, with its reason in `jobs show`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from support.pipeline import BUCKET, DONE, REGION, Pipeline, forged, run_one, settings_env
from support.receiver import Receiver
from support.sink_dir import written

from webhook.cli import main


def shown(pipeline: Pipeline, job_id: str) -> dict[str, object]:
    result = CliRunner().invoke(main, ["jobs", "show", job_id, "--json"], env=settings_env(pipeline.settings))
    assert result.exit_code == 0, result.output
    data: dict[str, object] = json.loads(result.output)
    return data


def assert_nothing_forwarded(pipeline: Pipeline) -> None:
    assert pipeline.http.requests == []
    assert not pipeline.sink_dir.exists() or written(pipeline.sink_dir) == []


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (
            {"Input": {"BucketId": "other-1250000000", "Object": "in/noisy.wav", "Region": REGION}},
            "input bucket other-1250000000 is not in WEBHOOK_ALLOWED_BUCKETS",
        ),
        (
            {"Input": {"BucketId": BUCKET, "Object": "in/noisy.wav", "Region": "ap-beijing"}},
            "input region ap-beijing is not an allowed region",
        ),
        (
            # A bucket "name" that is really a host: it must never become a URL host.
            {"Input": {"BucketId": "evil.example.com", "Object": "in/noisy.wav", "Region": REGION}},
            "input bucket evil.example.com is not in WEBHOOK_ALLOWED_BUCKETS",
        ),
        (
            {
                "Operation": {
                    "Output": {"Bucket": "other-1250000000", "Object": "out/denoised.wav", "Region": REGION},
                    "UserData": "order-42",
                }
            },
            # Refused from the allowlist, before CI is asked.
            "output bucket other-1250000000 is not in WEBHOOK_ALLOWED_BUCKETS",
        ),
        (
            {
                "Operation": {
                    "Output": {"Bucket": BUCKET, "Object": "out/other.wav", "Region": REGION},
                    "UserData": "order-42",
                }
            },
            f"output differs: callback says '{BUCKET}/out/other.wav in {REGION}', "
            f"CI says '{BUCKET}/out/denoised.wav in {REGION}'",
        ),
        (
            {
                "Operation": {
                    "Output": {"Bucket": BUCKET, "Object": "out/denoised.wav", "Region": REGION},
                    "UserData": "order-43",
                }
            },
            "user data differs: callback says 'order-43', CI says 'order-42'",
        ),
    ],
    ids=["bucket", "region", "bucket-as-host", "output-bucket", "output-key", "user-data"],
)
def test_forged_variant_of_a_genuine_job_is_rejected(
    pipeline: Pipeline, changes: dict[str, object], reason: str
) -> None:
    with Receiver() as elsewhere:
        job_id = pipeline.submit(pipeline.upload_input(), callback_url=elsewhere.url)
        pipeline.sandbox.wait_for_callbacks(1, timeout=20)
    assert pipeline.post_callback(forged(job_id, **changes)).status_code == 200

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "rejected"
    view = shown(pipeline, job_id)
    assert (view["status"], view["reason"], view["deliveries"]) == ("rejected", reason, [])
    assert_nothing_forwarded(pipeline)


def test_tag_not_allowed_is_recorded_and_never_verified(pipeline: Pipeline) -> None:
    job_id = "j" + "1" * 32
    assert pipeline.post_callback(forged(job_id, Tag="VoiceSeparate")).json()["ignored"] == [job_id]
    assert not run_one(pipeline.worker())
    view = shown(pipeline, job_id)
    assert (view["status"], view["reason"]) == ("ignored", "tag VoiceSeparate is not in WEBHOOK_ALLOWED_TAGS")
    assert_nothing_forwarded(pipeline)


def test_hostile_output_key_cannot_escape_the_sink_directory(pipeline: Pipeline) -> None:
    key = "../../escape/../../etc/passwd.wav"
    job_id = pipeline.submit(pipeline.upload_input(), output_key=key)
    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"
    assert written(pipeline.sink_dir) == [f"{job_id}.event.json", f"{job_id}.wav"]
    assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == pipeline.output_bytes(key)
    assert not (pipeline.sink_dir.parent / "escape").exists()
