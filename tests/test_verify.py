"""The verification decision, without servers: what the callback claims against what CI reports."""

from dataclasses import replace

import pytest

from webhook.ci.verify import Accept, Allowlist, Reject, Wait, decide
from webhook.models import Job, ObjectLocation

ALLOW = Allowlist(
    buckets=frozenset({"audio-1250000000"}), regions=frozenset({"ap-guangzhou"}), tags=frozenset({"NoiseReduction"})
)
JOB = Job(
    job_id="j" + "0" * 32,
    tag="NoiseReduction",
    state="Success",
    input=ObjectLocation("audio-1250000000", "ap-guangzhou", "in/a.wav"),
    output=ObjectLocation("audio-1250000000", "ap-guangzhou", "out/a.wav"),
    user_data="mine",
)


def test_matching_job_is_accepted() -> None:
    assert decide(JOB, JOB, ALLOW) == Accept()


def test_failed_job_that_ci_confirms_is_accepted() -> None:
    failed = replace(JOB, state="Failed", code="InternalError", message="boom")
    assert decide(failed, failed, ALLOW) == Accept()


@pytest.mark.parametrize("state", ["Submitted", "Running", "Pause"])
def test_unfinished_job_waits(state: str) -> None:
    assert decide(JOB, replace(JOB, state=state), ALLOW) == Wait(f"CI reports the job {state}")


@pytest.mark.parametrize(
    ("claimed", "reported", "reason"),
    [
        (JOB, None, f"CI does not know job {JOB.job_id} in bucket audio-1250000000"),
        (
            JOB,
            replace(JOB, state="Failed"),
            "state differs: callback says 'Success', CI says 'Failed'",
        ),
        (
            JOB,
            replace(JOB, output=ObjectLocation("audio-1250000000", "ap-guangzhou", "out/other.wav")),
            "output differs: callback says 'audio-1250000000/out/a.wav in ap-guangzhou', "
            "CI says 'audio-1250000000/out/other.wav in ap-guangzhou'",
        ),
        (JOB, replace(JOB, user_data="theirs"), "user data differs: callback says 'mine', CI says 'theirs'"),
        (JOB, replace(JOB, tag="VoiceSeparate"), "tag differs: callback says NoiseReduction, CI says VoiceSeparate"),
        (replace(JOB, tag="VoiceSeparate"), JOB, "tag VoiceSeparate is not allowed"),
        (replace(JOB, input=None), JOB, "callback has no Input.BucketId"),
        (
            replace(JOB, input=ObjectLocation("evil-1250000000", "ap-guangzhou", "in/a.wav")),
            JOB,
            "input bucket evil-1250000000 is not in WEBHOOK_ALLOWED_BUCKETS",
        ),
        (
            replace(JOB, input=ObjectLocation("audio-1250000000", "ap-beijing", "in/a.wav")),
            JOB,
            "input region ap-beijing is not an allowed region",
        ),
    ],
    ids=[
        "unknown-job",
        "state-differs",
        "output-differs",
        "user-data-differs",
        "tag-differs",
        "tag-not-allowed",
        "no-input",
        "bucket-not-allowed",
        "region-not-allowed",
    ],
)
def test_forgeries_are_rejected(claimed: Job, reported: Job | None, reason: str) -> None:
    assert decide(claimed, reported, ALLOW) == Reject(reason)


def test_output_outside_the_allowlist_is_rejected_even_when_ci_agrees() -> None:
    elsewhere = replace(JOB, output=ObjectLocation("other-1250000000", "ap-guangzhou", "out/a.wav"))
    assert decide(elsewhere, elsewhere, ALLOW) == Reject(
        "output bucket other-1250000000 is not in WEBHOOK_ALLOWED_BUCKETS"
    )


def test_success_without_output_is_rejected() -> None:
    bare = replace(JOB, output=None)
    assert decide(bare, bare, ALLOW) == Reject("job succeeded but names no output object")
