"""The event document every sink receives."""

from __future__ import annotations

import json
import re

import pytest

import webhook.sinks.events
from webhook.models import CosHeader, FetchedFile, FileDigest, Job, MediaSummary, ObjectLocation, OutputFile
from webhook.sinks.events import SCHEMA, build_event, event_document, event_id

# The job the module docstring's example describes.
EXAMPLE_JOB = Job(
    job_id="je8f65004eb8511eaaed4f377124a303c",
    tag="NoiseReduction",
    state="Success",
    code="Success",
    message="Success",
    creation_time="2024-05-01T10:00:00+0800",
    start_time="2024-05-01T10:00:01+0800",
    end_time="2024-05-01T10:00:09+0800",
    queue_id="p2242ab62c7c94486915508540933a2c6",
    queue_type="Speeching",
    input=ObjectLocation("audio-1250000000", "ap-guangzhou", "in/a.wav"),
    output=ObjectLocation("audio-1250000000", "ap-guangzhou", "out/a.wav"),
    user_data="order-42",
    job_level="0",
    format="wav",
    sample_rate="16000",
    cos_headers=(CosHeader("x-cos-meta-id", "42"),),
    progress="100",
    output_files=(
        OutputFile(
            "audio-1250000000",
            "ap-guangzhou",
            ("out/a.wav",),
            digests=(FileDigest("out/a.wav", "9e107d9d372bb6826bd81d3542a419d6"),),
        ),
    ),
    media_info=MediaSummary("wav", "0.032000", "1024", "256.000000", "pcm_s16le", "16000", "1"),
)
EXAMPLE_FILE = FetchedFile(
    path="/tmp/a.wav",
    size=1024,
    crc64="6230416154291387364",
    content_type="audio/wav",
    etag='"e1"',
    md5="9e107d9d372bb6826bd81d3542a419d6",
)
FAILED_JOB = Job(job_id="jfailed0000000000000000000000001", tag="NoiseReduction", state="Failed", code="InternalError")


def test_event_id_is_stable_and_distinct_per_sink_and_job() -> None:
    first = event_id("j1", "http")
    assert first == event_id("j1", "http")
    assert re.fullmatch(r"evt_[0-9a-f]{32}", first)
    assert len({first, event_id("j1", "filesystem"), event_id("j2", "http")}) == 3


def test_event_id_separates_job_and_sink() -> None:
    # Without a separator "ab"+"c" and "a"+"bc" would share a key.
    assert event_id("ab", "c") != event_id("a", "bc")


def test_docstring_example_matches_the_metadata() -> None:
    doc = webhook.sinks.events.__doc__
    assert doc is not None
    example = doc[doc.index("::") + 2 : doc.index("A failed job")]
    assert event_document(build_event(EXAMPLE_JOB, "filesystem", EXAMPLE_FILE)) == json.loads(example)


def test_succeeded_event() -> None:
    event = build_event(EXAMPLE_JOB, "http", EXAMPLE_FILE)
    assert (event.event_id, event.type, event.file) == (
        event_id(EXAMPLE_JOB.job_id, "http"),
        "job.succeeded",
        EXAMPLE_FILE,
    )
    metadata = event_document(event)
    assert metadata["schema"] == SCHEMA
    assert metadata["file"]["name"] == "a.wav"
    assert metadata == json.loads(json.dumps(metadata))


def test_failed_event_has_no_file() -> None:
    metadata = event_document(build_event(FAILED_JOB, "http", None))
    assert metadata["type"] == "job.failed"
    assert metadata["file"] is None
    assert metadata["job"]["code"] == "InternalError"
    assert metadata["job"]["output"] is None


def test_canceled_job_is_a_failure() -> None:
    job = Job(job_id="jcanceled", tag="NoiseReduction", state="Cancel")
    assert build_event(job, "http", None).type == "job.failed"


@pytest.mark.parametrize(
    ("job", "file"),
    [
        (EXAMPLE_JOB, None),  # a success must come with its output
        (FAILED_JOB, EXAMPLE_FILE),
        (Job(job_id="j", tag="NoiseReduction", state="Running"), None),
        (Job(job_id="j", tag="NoiseReduction", state="Success"), EXAMPLE_FILE),  # no output location
    ],
)
def test_inconsistent_events_are_refused(job: Job, file: FetchedFile | None) -> None:
    with pytest.raises(ValueError, match="no event for state"):
        build_event(job, "http", file)
