"""The event document every sink receives."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

import webhook.sinks.events
from webhook.models import (
    CosHeader,
    FetchedFile,
    FileDigest,
    FileLocation,
    Job,
    JobFile,
    MediaSummary,
    ObjectLocation,
    OutputFile,
)
from webhook.sinks.common import audio_names
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
    example = doc[doc.index("::") + 2 : doc.index("``files`` lists")]
    event = build_event(EXAMPLE_JOB, "filesystem", EXAMPLE_FILE)
    # What the filesystem sink writes: its own document names what it stored the file as.
    assert event_document(event, audio_names("", event)) == json.loads(example)


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
    assert metadata["files"] == [metadata["file"]]  # one file: the same, listed
    assert metadata == json.loads(json.dumps(metadata))


def test_failed_event_has_no_file() -> None:
    metadata = event_document(build_event(FAILED_JOB, "http", None))
    assert metadata["type"] == "job.failed"
    assert metadata["file"] is None
    assert metadata["files"] == []
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


# -- a job that wrote several files -------------------------------------------------------------------

PARTS = (
    ObjectLocation("audio-1250000000", "ap-guangzhou", "out/a-1.wav"),
    ObjectLocation("audio-1250000000", "ap-guangzhou", "out/a-2.mp3"),
)
SEVERAL_JOB = replace(
    EXAMPLE_JOB,
    output=PARTS[0],
    output_files=(
        OutputFile(
            "audio-1250000000",
            "ap-guangzhou",
            tuple(part.key for part in PARTS),
            digests=tuple(FileDigest(part.key, f"{n}" * 32) for n, part in enumerate(PARTS, start=1)),
        ),
    ),
)
SEVERAL_FILES = tuple(
    JobFile(part, replace(EXAMPLE_FILE, size=1000 + n, md5=f"{n}" * 32), n, len(PARTS))
    for n, part in enumerate(PARTS, start=1)
)
SCHEMA_VALIDATOR = Draft202012Validator(
    json.loads((Path(__file__).resolve().parents[1] / "schemas" / "event-v1.schema.json").read_text())
)


def test_every_file_is_listed_in_ci_s_order_and_file_is_the_first() -> None:
    event = build_event(SEVERAL_JOB, "filesystem", SEVERAL_FILES)
    document = event_document(event, audio_names("", event))

    assert [(f["name"], f["size"], f["md5"], f["stored_as"]) for f in document["files"]] == [
        ("a-1.wav", 1001, "1" * 32, f"{SEVERAL_JOB.job_id}.1.wav"),
        ("a-2.mp3", 1002, "2" * 32, f"{SEVERAL_JOB.job_id}.2.mp3"),
    ]
    # v1's one file is the first, as a receiver written for one file per job reads it.
    assert document["file"] == {k: v for k, v in document["files"][0].items() if k != "stored_as"}
    assert event.file == SEVERAL_FILES[0].fetched
    SCHEMA_VALIDATOR.validate(document)


def test_a_notification_says_where_each_file_is() -> None:
    located = tuple(
        replace(file, location=FileLocation("cos", "archive-1250000000", f"d/{SEVERAL_JOB.job_id}.{file.number}.wav"))
        for file in SEVERAL_FILES
    )
    document = event_document(build_event(SEVERAL_JOB, "events", located))

    assert [f["location"]["key"] for f in document["files"]] == [
        f"d/{SEVERAL_JOB.job_id}.1.wav",
        f"d/{SEVERAL_JOB.job_id}.2.wav",
    ]
    assert document["file"]["location"] == document["files"][0]["location"]
    assert all("stored_as" not in f for f in document["files"])
    SCHEMA_VALIDATOR.validate(document)


def test_the_event_id_is_per_job_and_sink_whatever_the_files() -> None:
    assert build_event(SEVERAL_JOB, "http", SEVERAL_FILES).event_id == event_id(SEVERAL_JOB.job_id, "http")
    assert build_event(SEVERAL_JOB, "http", SEVERAL_FILES[:1]).event_id == event_id(SEVERAL_JOB.job_id, "http")


def test_stored_names_must_match_the_files() -> None:
    with pytest.raises(ValueError, match="shorter"):
        event_document(build_event(SEVERAL_JOB, "filesystem", SEVERAL_FILES), ("only-one.wav",))


@pytest.mark.parametrize(
    "document",
    [
        event_document(build_event(EXAMPLE_JOB, "http", EXAMPLE_FILE)),
        event_document(build_event(FAILED_JOB, "http", None)),
        # A v1 document written before ``files`` existed is still v1.
        {k: v for k, v in event_document(build_event(EXAMPLE_JOB, "http", EXAMPLE_FILE)).items() if k != "files"},
    ],
    ids=["succeeded", "failed", "without-files"],
)
def test_documents_match_the_schema(document: dict[str, object]) -> None:
    SCHEMA_VALIDATOR.validate(document)


def test_the_schema_refuses_a_stored_name_on_file_and_files_that_do_not_fit_the_type() -> None:
    event = build_event(SEVERAL_JOB, "filesystem", SEVERAL_FILES)
    document = event_document(event, audio_names("", event))
    broken = {
        "stored_as on file": document | {"file": document["files"][0]},
        "a succeeded job without files": document | {"files": []},
        "a failed job with files": event_document(build_event(FAILED_JOB, "http", None)) | {"files": document["files"]},
        "a member added to a listed file": document | {"files": [document["files"][0] | {"number": 1}]},
    }
    assert [name for name, doc in broken.items() if SCHEMA_VALIDATOR.is_valid(doc)] == []
