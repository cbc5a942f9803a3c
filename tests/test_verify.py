"""The verification decision, without servers: what the callback claims against what CI reports."""

from dataclasses import replace

import pytest

from webhook.ci.verify import (
    Accept,
    Allowlist,
    FoundAt,
    OutputUnknown,
    Reject,
    Wait,
    confirmed,
    decide,
    precheck,
    where_to_ask,
    written_outputs,
)
from webhook.models import FileDigest, Job, ObjectLocation, OutputFile

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


WIDE = Allowlist(
    buckets=frozenset({"audio-1250000000", "podcasts-1250000000"}),
    regions=frozenset({"ap-guangzhou", "ap-shanghai"}),
    tags=frozenset({"NoiseReduction"}),
)


@pytest.mark.parametrize(
    "claimed",
    [
        replace(JOB, input=None, output=None, user_data=""),
        replace(JOB, input=ObjectLocation("", "", "in/a.wav"), output=ObjectLocation("", "", "out/a.wav")),
        replace(JOB, input=ObjectLocation("", "ap-guangzhou", ""), user_data=""),
    ],
    ids=["left-out", "buckets-and-regions-empty", "only-a-region"],
)
def test_what_the_callback_leaves_out_is_not_a_claim(claimed: Job) -> None:
    assert precheck(claimed, ALLOW) is None
    assert decide(claimed, JOB, ALLOW) == Accept()
    assert confirmed(claimed, JOB) == JOB  # CI's locations and user data are the job's


def test_what_the_callback_states_must_still_agree() -> None:
    claimed = replace(JOB, input=ObjectLocation("", "", "in/other.wav"))
    assert decide(claimed, JOB, ALLOW) == Reject(
        "input differs: callback says '/in/other.wav in ', CI says 'audio-1250000000/in/a.wav in ap-guangzhou'"
    )


@pytest.mark.parametrize(
    ("claimed", "reason"),
    [
        (
            replace(JOB, output=ObjectLocation("other-1250000000", "", "out/a.wav")),
            "output bucket other-1250000000 is not in WEBHOOK_ALLOWED_BUCKETS",
        ),
        (
            replace(JOB, input=None, output=ObjectLocation("", "ap-beijing", "out/a.wav")),
            "output region ap-beijing is not an allowed region",
        ),
        (
            replace(JOB, output_files=(OutputFile("other-1250000000", "ap-guangzhou", ("out/a.wav",)),)),
            "output bucket other-1250000000 is not in WEBHOOK_ALLOWED_BUCKETS",
        ),
    ],
    ids=["output-bucket", "output-region", "result-file-bucket"],
)
def test_a_stated_foreign_output_is_refused_before_any_call(claimed: Job, reason: str) -> None:
    assert precheck(claimed, ALLOW) == Reject(reason)


def test_ci_output_outside_the_allowlist_is_refused_even_when_the_callback_left_it_out() -> None:
    reported = replace(JOB, output=ObjectLocation("other-1250000000", "ap-guangzhou", "out/a.wav"))
    assert decide(replace(JOB, output=None), reported, ALLOW) == Reject(
        "output bucket other-1250000000 is not in WEBHOOK_ALLOWED_BUCKETS"
    )


def test_a_stated_location_is_the_only_place_asked() -> None:
    assert where_to_ask(JOB, WIDE) == (("ap-guangzhou", "audio-1250000000"),)


def test_a_missing_bucket_is_searched_in_the_stated_region() -> None:
    claimed = replace(JOB, input=ObjectLocation("", "ap-shanghai", "in/a.wav"), output=None)
    assert where_to_ask(claimed, WIDE) == (("ap-shanghai", "audio-1250000000"), ("ap-shanghai", "podcasts-1250000000"))


def test_a_missing_bucket_and_region_are_searched_everywhere_allowed_with_the_output_bucket_first() -> None:
    claimed = replace(JOB, input=None, output=ObjectLocation("podcasts-1250000000", "", "out/a.wav"))
    assert where_to_ask(claimed, WIDE) == (
        ("ap-guangzhou", "podcasts-1250000000"),
        ("ap-shanghai", "podcasts-1250000000"),
        ("ap-guangzhou", "audio-1250000000"),
        ("ap-shanghai", "audio-1250000000"),
    )


def test_a_job_no_allowlisted_bucket_knows_is_rejected_naming_where_it_was_looked_for() -> None:
    claimed = replace(JOB, input=None, output=None)
    assert decide(claimed, None, WIDE) == Reject(
        f"no allowlisted bucket knows job {JOB.job_id} (asked audio-1250000000 in ap-guangzhou, "
        "audio-1250000000 in ap-shanghai, podcasts-1250000000 in ap-guangzhou, podcasts-1250000000 in ap-shanghai)"
    )


def test_what_ci_leaves_empty_is_taken_from_the_callback() -> None:
    reported = replace(JOB, user_data="", cos_headers=())
    claimed = replace(JOB, progress="100")
    assert confirmed(claimed, reported) == replace(JOB, progress="100")


# -- what was written: the objects a successful job's deliveries fetch -------------------------------

TEMPLATE = replace(JOB, output=ObjectLocation("audio-1250000000", "ap-guangzhou", "out/a-${Number}.wav"))


def at(key: str) -> ObjectLocation:
    return ObjectLocation("audio-1250000000", "ap-guangzhou", key)


def test_a_plain_output_ci_names_nothing_for_is_the_one_file() -> None:
    assert written_outputs(JOB) == (JOB.output,)


def test_the_one_file_ci_names_is_fetched_instead_of_the_name_submitted() -> None:
    job = replace(TEMPLATE, output_files=(OutputFile("", "", ("out/a-1.wav",)),))
    assert written_outputs(job) == (at("out/a-1.wav"),)  # an empty bucket and region are the output's


def test_every_file_ci_names_is_written_in_its_order_once() -> None:
    job = replace(
        TEMPLATE,
        output_files=(
            OutputFile(
                "audio-1250000000",
                "ap-guangzhou",
                ("out/a-2.wav", "out/a-1.wav"),
                digests=(FileDigest("out/a-2.wav", "2" * 32), FileDigest("out/a-1.wav", "1" * 32)),
            ),
            OutputFile("", "", ("out/a-3.wav", "out/a-2.wav")),  # a name given again is the same file
        ),
    )
    written = written_outputs(job)
    assert written == (at("out/a-2.wav"), at("out/a-1.wav"), at("out/a-3.wav"))
    # The verified job's output is the first of them; its deliveries find the same objects from it.
    assert written_outputs(replace(job, output=written[0])) == written


@pytest.mark.parametrize(
    ("output_files", "reason"),
    [
        ((), "output 'out/a-${Number}.wav' is a template and CI names no file it wrote"),
        (
            (OutputFile("audio-1250000000", "ap-guangzhou", (), "out/segments/"),),
            "CI wrote files under 'out/segments/' without naming them: there is none to fetch",
        ),
    ],
    ids=["template", "prefix"],
)
def test_nothing_named_to_fetch_is_output_unknown(output_files: tuple[OutputFile, ...], reason: str) -> None:
    with pytest.raises(OutputUnknown) as unknown:
        written_outputs(replace(TEMPLATE, output_files=output_files))
    assert str(unknown.value) == reason


def test_where_a_job_was_found_is_remembered_boundedly() -> None:
    found = FoundAt(limit=2)
    found.remember("j1", ("ap-guangzhou", "audio-1250000000"))
    found.remember("j2", ("ap-shanghai", "podcasts-1250000000"))
    found.remember("j1", ("ap-guangzhou", "audio-1250000000"))  # used again: the newest
    found.remember("j3", ("ap-shanghai", "audio-1250000000"))

    assert found.get("j2") is None  # the oldest went first
    assert found.get("j1") == ("ap-guangzhou", "audio-1250000000")
    assert found.get("j3") == ("ap-shanghai", "audio-1250000000")
