"""The parser reads every shape CI really sends (tests/support/shapes.py), in XML and JSON alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from support.shapes import (
    BUCKET,
    JOB_ID,
    OUTPUT_MD5,
    REGION,
    WORKFLOW_JOB_ID,
    as_json,
    as_xml,
    detail,
    empty_locations,
    object_only_input,
    several_files,
    workflow_execution,
    workflow_json,
    workflow_task,
    workflow_xml,
)

from webhook.intake.callback import CallbackError, parse_callback
from webhook.intake.outputs import MAX_OUTPUT_NAMES
from webhook.intake.triage import triage
from webhook.models import CosHeader, FileDigest, Job, MediaSummary, ObjectLocation, OutputFile, Workflow

ENCODERS: dict[str, Callable[[dict[str, Any]], bytes]] = {"xml": as_xml, "json": as_json}


def parsed_job(fmt: str, job: dict[str, Any]) -> Job:
    callback = parse_callback(ENCODERS[fmt](job))
    assert callback.body_format == fmt
    (only,) = callback.jobs
    return only


@pytest.mark.parametrize("fmt", ENCODERS)
def test_a_full_callback_keeps_what_ci_wrote_and_what_it_measured(fmt: str) -> None:
    job = parsed_job(fmt, detail())

    assert (job.job_id, job.state, job.message, job.progress, job.sub_tag) == (
        JOB_ID,
        "Success",
        "",
        "100",
        "NoiseReduction",
    )
    assert job.output == ObjectLocation(BUCKET, REGION, "clean/${InputName}.${ext}")  # as submitted
    assert job.output_files == (
        OutputFile(BUCKET, REGION, ("clean/raw.wav",), "", (FileDigest("clean/raw.wav", OUTPUT_MD5),)),
    )
    assert job.media_info == MediaSummary("wav", "4.000000", "128044", "256.012000", "pcm_s16le", "16000", "1")
    assert job.cos_headers == (
        CosHeader("Content-Type", "audio/wav"),
        CosHeader("x-cos-meta-call", "c-77"),
        CosHeader("EventName", "cos:ObjectCreated:Put"),
    )
    assert job.workflow == Workflow(
        "NoiseReduction_1709600000000",
        "i3f2e1d0c9b8a11efa1b2525400c3d4e5",
        "w4c3b2a19f8e74d6c5b4a39281706f5e4",
        "calls-denoise",
    )
    assert (job.sample_rate, job.job_level, job.template_name) == ("16000", "0", "denoise-16k")


@pytest.mark.parametrize("fmt", ENCODERS)
def test_empty_buckets_are_read_as_not_stated(fmt: str) -> None:
    job = parsed_job(fmt, empty_locations())

    assert job.input == ObjectLocation("", REGION, "calls/2024/0305/raw.wav")
    assert job.output == ObjectLocation("", REGION, "clean/${InputName}.${ext}")
    assert job.output_files[0].bucket == ""
    assert job.output_files[0].object_names == ("clean/raw.wav",)


@pytest.mark.parametrize("fmt", ENCODERS)
def test_an_input_with_only_its_object(fmt: str) -> None:
    job = parsed_job(fmt, object_only_input())

    assert job.input == ObjectLocation("", "", "calls/2024/0305/raw.wav")
    assert job.cos_headers == ()


@pytest.mark.parametrize("fmt", ENCODERS)
def test_several_output_files_each_with_its_digest(fmt: str) -> None:
    job = parsed_job(fmt, several_files())

    (written,) = job.output_files
    assert written.object_names == ("clean/part-1.wav", "clean/part-2.wav")
    assert [d.object_name for d in written.digests] == ["clean/part-1.wav", "clean/part-2.wav"]


@pytest.mark.parametrize("fmt", ENCODERS)
def test_several_output_file_elements(fmt: str) -> None:
    second = {"Bucket": BUCKET, "Region": REGION, "ObjectName": "clean/raw.txt", "ObjectPrefix": None}
    first = detail()["Operation"]["MediaResult"]["OutputFile"]
    job = parsed_job(fmt, detail(Operation={"MediaResult": {"OutputFile": [first, second]}}))

    assert [f.object_names for f in job.output_files] == [("clean/raw.wav",), ("clean/raw.txt",)]
    assert job.output_files[1].digests == ()


def test_json_numbers_read_as_the_strings_xml_carries() -> None:
    job = parse_callback(as_json(detail(), numbers=True)).jobs[0]

    assert job.progress == "100"
    assert job.media_info is not None
    assert job.media_info.size == "128044"


@pytest.mark.parametrize("fmt", ENCODERS)
def test_placeholders_for_outputs_not_made_are_dropped(fmt: str) -> None:
    blank = {"Bucket": None, "Md5Info": None, "ObjectName": None, "ObjectPrefix": None, "Region": None}
    job = parsed_job(fmt, detail(Operation={"MediaResult": {"OutputFile": blank}, "MediaInfo": None}))

    assert job.output_files == ()
    assert job.media_info is None


@pytest.mark.parametrize("fmt", ENCODERS)
def test_a_prefix_without_names_is_kept(fmt: str) -> None:
    result = {"OutputFile": {"ObjectName": None, "Md5Info": None, "ObjectPrefix": "clean/segments/"}}
    job = parsed_job(fmt, detail(Operation={"MediaResult": result}))

    assert job.output_files == (OutputFile(BUCKET, REGION, (), "clean/segments/", ()),)


def test_an_md5_is_compared_in_lower_case() -> None:
    digest = {"Md5": OUTPUT_MD5.upper(), "ObjectName": "clean/raw.wav"}
    job = parse_callback(as_json(detail(Operation={"MediaResult": {"OutputFile": {"Md5Info": digest}}}))).jobs[0]

    assert job.output_files[0].digests == (FileDigest("clean/raw.wav", OUTPUT_MD5),)


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ({"OutputFile": "clean/raw.wav"}, "JobsDetail[0].Operation.MediaResult.OutputFile[0] must be an object"),
        (
            {"OutputFile": {"ObjectName": [{"Name": "x"}]}},
            "JobsDetail[0].Operation.MediaResult.OutputFile[0].ObjectName[0] must be a string",
        ),
        (
            {"OutputFile": {"ObjectName": "a", "Md5Info": ["x"]}},
            "JobsDetail[0].Operation.MediaResult.OutputFile[0].Md5Info[0] must be an object",
        ),
        (
            {"OutputFile": {"ObjectName": [f"o/{n}" for n in range(MAX_OUTPUT_NAMES + 1)]}},
            f"JobsDetail[0].Operation.MediaResult lists more than {MAX_OUTPUT_NAMES} objects",
        ),
        ("not an object", "JobsDetail[0].Operation.MediaResult must be an object"),
    ],
)
def test_a_malformed_media_result_is_refused_with_its_place(result: Any, message: str) -> None:
    with pytest.raises(CallbackError) as caught:
        parse_callback(as_json(detail(Operation={"MediaResult": result})))

    assert (caught.value.status, caught.value.message) == (400, message)


WORKFLOW_ENCODERS: dict[str, Callable[[dict[str, Any]], bytes]] = {"xml": workflow_xml, "json": workflow_json}


@pytest.mark.parametrize("fmt", WORKFLOW_ENCODERS)
def test_a_workflow_run_reports_each_task_as_a_job(fmt: str) -> None:
    callback = parse_callback(WORKFLOW_ENCODERS[fmt](workflow_execution()))

    assert callback.event_name == "WorkflowFinish"
    denoise, snapshot = callback.jobs
    assert (denoise.job_id, denoise.tag, denoise.state) == (WORKFLOW_JOB_ID, "NoiseReduction", "Success")
    assert denoise.input == ObjectLocation("", "", "calls/2024/0305/raw.wav")
    assert denoise.output is None  # DescribeMediaJob tells
    assert denoise.workflow == Workflow(
        "NoiseReduction_1709600000000",
        "i6b5a4c3d2e1f11ef9a8b525400e1f2a3",
        "w4c3b2a19f8e74d6c5b4a39281706f5e4",
        "calls-denoise",
    )
    assert denoise.cos_headers == (CosHeader("Content-Type", "audio/wav"),)
    assert (snapshot.tag, snapshot.workflow and snapshot.workflow.name) == ("Snapshot", "Snapshot_1")


def test_workflow_tasks_of_an_allowed_tag_are_forwarded_the_others_recorded() -> None:
    callback = parse_callback(workflow_json(workflow_execution()))

    denoise, snapshot = triage(callback, frozenset({"NoiseReduction"}))

    assert (denoise.forward, denoise.reason) == (True, "")
    assert (snapshot.forward, snapshot.reason) == (False, "tag Snapshot is not in WEBHOOK_ALLOWED_TAGS")


def test_a_task_that_never_ran_is_left_out() -> None:
    skipped = workflow_task(JobId=None, State="Skipped")
    callback = parse_callback(workflow_json(workflow_execution(workflow_task(), skipped)))

    assert [job.job_id for job in callback.jobs] == [WORKFLOW_JOB_ID]


def test_a_workflow_event_without_its_execution_is_recorded_with_no_jobs() -> None:
    assert parse_callback(b'{"EventName": "WorkflowFinish"}').jobs == ()


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (workflow_task(Type=None), "WorkflowExecution.Tasks[0]: missing Type"),
        (workflow_task(State="Exploded"), "WorkflowExecution.Tasks[0].State must be one of"),
        (workflow_task(JobId="../etc"), "WorkflowExecution.Tasks[0].JobId must be 1 to 128 letters"),
        ("NoiseReduction", "WorkflowExecution.Tasks[0] must be an object"),
    ],
)
def test_a_malformed_task_is_refused_with_its_place(task: Any, message: str) -> None:
    with pytest.raises(CallbackError) as caught:
        parse_callback(workflow_json(workflow_execution(task)))

    assert caught.value.status == 400
    assert caught.value.message.startswith(message)
