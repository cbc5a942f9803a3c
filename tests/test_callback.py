"""The callback parser alone: every documented shape in XML and JSON, and every refusal's exact message."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from support.samples import BAD_INPUTS, DOC_JOB, DOC_JSON, DOC_XML, DROP, FORMATS, JOB_ID, body, job, operation

from webhook.intake.callback import CallbackError, parse_callback
from webhook.models import Callback, CosHeader, Job, Workflow

WORKFLOW = {
    "Name": "NoiseReductionNode",
    "RunId": "i5f7a8e2ac7a611ec8d0b525400d1e1bf",
    "WorkflowId": "w5307ee7a60d6489383c3921c715dd1c5",
    "WorkflowName": "denoise-uploads",
}


def only_job(callback: Callback) -> Job:
    assert len(callback.jobs) == 1
    return callback.jobs[0]


# -- the documented samples -------------------------------------------------------------------


def test_documented_xml_sample_parses_to_every_field() -> None:
    assert parse_callback(DOC_XML) == Callback(event_name="TaskFinish", jobs=(DOC_JOB,), body_format="xml")


def test_documented_json_sample_parses_to_the_same_job_as_xml() -> None:
    assert parse_callback(DOC_JSON) == Callback(event_name="TaskFinish", jobs=(DOC_JOB,), body_format="json")


@pytest.mark.parametrize("fmt", FORMATS)
def test_builder_reproduces_the_documented_job(fmt: str) -> None:
    assert parse_callback(body(fmt, job())) == Callback("TaskFinish", (DOC_JOB,), fmt)


def test_xml_declaration_is_accepted() -> None:
    text = b'<?xml version="1.0" encoding="UTF-8"?>\n' + DOC_XML
    assert parse_callback(text).jobs == (DOC_JOB,)


# -- JobsDetail as one object, an array, several jobs -------------------------------------------


def test_json_jobsdetail_object_and_one_element_array_parse_alike() -> None:
    as_object = parse_callback(body("json", job()))
    as_array = parse_callback(body("json", [job()]))
    assert as_object == as_array == Callback("TaskFinish", (DOC_JOB,), "json")


@pytest.mark.parametrize("fmt", FORMATS)
def test_several_jobs_in_one_callback_keep_their_order(fmt: str) -> None:
    ids = ["j0000000000000000000000000000000b", "j0000000000000000000000000000000a", "j-c_3"]
    details = [job(ids[0]), job(ids[1], State="Failed", Code="InternalError"), job(ids[2], Tag="VoiceSeparate")]

    parsed = parse_callback(body(fmt, details))

    assert [j.job_id for j in parsed.jobs] == ids
    assert [j.state for j in parsed.jobs] == ["Success", "Failed", "Success"]
    assert [j.code for j in parsed.jobs] == ["Success", "InternalError", "Success"]
    assert [j.tag for j in parsed.jobs] == ["NoiseReduction", "NoiseReduction", "VoiceSeparate"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_exactly_100_jobs_are_accepted(fmt: str) -> None:
    details = [job(f"j{n:032x}") for n in range(100)]
    assert len(parse_callback(body(fmt, details)).jobs) == 100


@pytest.mark.parametrize("fmt", FORMATS)
def test_duplicate_job_ids_in_one_callback_collapse_to_the_first(fmt: str) -> None:
    other = "j0000000000000000000000000000000b"
    details = [job(), job(other), job(State="Failed", Message="second copy")]

    parsed = parse_callback(body(fmt, details))

    assert [j.job_id for j in parsed.jobs] == [JOB_ID, other]
    assert parsed.jobs[0] == DOC_JOB


# -- workflow jobs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_workflow_job_with_one_cos_header(fmt: str) -> None:
    detail = job(
        Input={**job()["Input"], "CosHeaders": {"Key": "x-cos-meta-id", "Value": "1234"}},
        Workflow=WORKFLOW,
    )

    parsed = only_job(parse_callback(body(fmt, detail)))

    assert parsed == replace(
        DOC_JOB,
        cos_headers=(CosHeader(key="x-cos-meta-id", value="1234"),),
        workflow=Workflow(
            name="NoiseReductionNode",
            run_id="i5f7a8e2ac7a611ec8d0b525400d1e1bf",
            workflow_id="w5307ee7a60d6489383c3921c715dd1c5",
            workflow_name="denoise-uploads",
        ),
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_workflow_job_with_many_cos_headers_keeps_them_in_order(fmt: str) -> None:
    headers = [
        {"Key": "x-cos-meta-id", "Value": "1234"},
        {"Key": "Content-Type", "Value": "audio/mpeg"},
        {"Key": "x-cos-meta-empty", "Value": None},
    ]
    detail = job(Input={**job()["Input"], "CosHeaders": headers}, Workflow=WORKFLOW)

    parsed = only_job(parse_callback(body(fmt, detail)))

    assert parsed.cos_headers == (
        CosHeader("x-cos-meta-id", "1234"),
        CosHeader("Content-Type", "audio/mpeg"),
        CosHeader("x-cos-meta-empty", ""),
    )
    assert parsed.workflow == Workflow(
        "NoiseReductionNode", WORKFLOW["RunId"], WORKFLOW["WorkflowId"], "denoise-uploads"
    )
    assert parsed.input == DOC_JOB.input


def test_json_cos_headers_as_one_element_array_equal_the_object_form() -> None:
    header = {"Key": "x-cos-meta-id", "Value": "1234"}
    as_object = parse_callback(body("json", job(Input={"BucketId": "b-1", "CosHeaders": header})))
    as_array = parse_callback(body("json", job(Input={"BucketId": "b-1", "CosHeaders": [header]})))
    assert as_object == as_array
    assert only_job(as_array).cos_headers == (CosHeader("x-cos-meta-id", "1234"),)


@pytest.mark.parametrize("fmt", FORMATS)
def test_job_without_workflow_has_none_and_no_headers(fmt: str) -> None:
    parsed = only_job(parse_callback(body(fmt, job())))
    assert parsed.workflow is None
    assert parsed.cos_headers == ()


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_workflow_is_absent(fmt: str) -> None:
    assert only_job(parse_callback(body(fmt, job(Workflow=None)))).workflow is None


@pytest.mark.parametrize("empty", [None, ""])
def test_json_null_or_empty_cos_headers_are_no_headers(empty: str | None) -> None:
    detail = job(Input={"BucketId": "b-1", "CosHeaders": empty})
    assert only_job(parse_callback(body("json", detail))).cos_headers == ()


def test_empty_xml_cos_headers_element_is_no_headers() -> None:
    detail = job(Input={"BucketId": "b-1", "CosHeaders": None})
    assert b"<CosHeaders/>" in body("xml", detail)
    assert only_job(parse_callback(body("xml", detail))).cos_headers == ()


# -- empty elements, unknown fields, odd encodings ---------------------------------------------------


def test_empty_xml_elements_are_empty_strings() -> None:
    detail = job(Code=None, Message=None, QueueId=None, Operation=operation(UserData=None, JobLevel=None))
    assert b"<Message/>" in body("xml", detail)

    parsed = only_job(parse_callback(body("xml", detail)))

    assert (parsed.code, parsed.message, parsed.queue_id) == ("", "", "")
    assert (parsed.user_data, parsed.job_level, parsed.template_id, parsed.template_name) == ("", "", "", "")


def test_xml_open_close_pair_with_no_text_is_an_empty_string() -> None:
    text = DOC_XML.replace(b"<Message>SUCCESS</Message>", b"<Message></Message>")
    assert only_job(parse_callback(text)).message == ""


def test_json_nulls_are_empty_strings() -> None:
    detail = job(Code=None, Message=None, Operation=operation(UserData=None, NoiseReduction=None))
    parsed = only_job(parse_callback(body("json", detail)))
    assert (parsed.code, parsed.message, parsed.user_data, parsed.format, parsed.sample_rate) == ("", "", "", "", "")


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_containers_leave_locations_absent(fmt: str) -> None:
    parsed = only_job(parse_callback(body(fmt, job(Input=None, Operation=None))))
    assert parsed.input is None
    assert parsed.output is None
    assert (parsed.user_data, parsed.format, parsed.sample_rate) == ("", "", "")


@pytest.mark.parametrize("fmt", FORMATS)
def test_unknown_fields_at_every_level_are_ignored(fmt: str) -> None:
    nested_unknown = {"Level1": {"Level2": [{"Deep": "1"}, {"Deep": {"Deeper": "2"}}]}, "Flag": "true"}
    detail = job(
        Input={**job()["Input"], "Size": "123456", "Extra": nested_unknown},
        Operation=operation(
            DigitalWatermark={"Type": "Text", "State": "Failed", "Extra": nested_unknown},
            NoiseReduction={"Format": "wav", "SampleRate": "16000", "Bitrate": "128"},
            Output={**operation()["Output"], "StorageClass": "STANDARD"},
            WatermarkTemplateId=["t1", "t2"],
        ),
        Unknown=nested_unknown,
    )

    parsed = parse_callback(body(fmt, detail, RequestId="NjJkY2U", Trace=nested_unknown))

    assert parsed == Callback("TaskFinish", (DOC_JOB,), fmt)


def test_unknown_xml_attributes_are_ignored() -> None:
    text = DOC_XML.replace(b"<Response>", b'<Response xmlns="urn:ci" version="2">').replace(
        b"<JobsDetail>", b'<JobsDetail index="0">'
    )
    assert parse_callback(text).jobs == (DOC_JOB,)


@pytest.mark.parametrize("fmt", FORMATS)
def test_utf8_bom_is_skipped(fmt: str) -> None:
    assert parse_callback(b"\xef\xbb\xbf" + body(fmt, job())) == Callback("TaskFinish", (DOC_JOB,), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_leading_and_trailing_whitespace_is_allowed(fmt: str) -> None:
    assert parse_callback(b" \r\n\t" + body(fmt, job()) + b"\r\n") == Callback("TaskFinish", (DOC_JOB,), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_ascii_text_survives(fmt: str) -> None:
    detail = job(Operation=operation(UserData="降噪任务 — ünïcode & <markup>"))
    assert only_job(parse_callback(body(fmt, detail))).user_data == "降噪任务 — ünïcode & <markup>"


def test_json_numbers_where_strings_are_expected_become_strings() -> None:
    detail = job(
        Operation=operation(JobLevel=0, NoiseReduction={"Format": "wav", "SampleRate": 16000}),
        QueueId=12345,
        Code=0.5,
    )
    parsed = only_job(parse_callback(body("json", detail)))
    assert (parsed.job_level, parsed.sample_rate, parsed.queue_id, parsed.code) == ("0", "16000", "12345", "0.5")


@pytest.mark.parametrize("fmt", FORMATS)
def test_samplerate_spelling_is_accepted(fmt: str) -> None:
    detail = job(Operation=operation(NoiseReduction={"Format": "mp3", "Samplerate": "44100"}))
    parsed = only_job(parse_callback(body(fmt, detail)))
    assert (parsed.format, parsed.sample_rate) == ("mp3", "44100")


@pytest.mark.parametrize("fmt", FORMATS)
def test_samplerate_with_capital_r_wins_over_lowercase(fmt: str) -> None:
    detail = job(Operation=operation(NoiseReduction={"SampleRate": "16000", "Samplerate": "8000"}))
    assert only_job(parse_callback(body(fmt, detail))).sample_rate == "16000"


@pytest.mark.parametrize("fmt", FORMATS)
def test_fields_at_the_length_limits_are_accepted(fmt: str) -> None:
    detail = job("j" * 128, Message="m" * 4096)
    parsed = only_job(parse_callback(body(fmt, detail)))
    assert parsed.job_id == "j" * 128
    assert parsed.message == "m" * 4096


@pytest.mark.parametrize("job_id", ["j1", "ABC-def_123", "-", "_"])
def test_job_ids_of_letters_digits_dash_underscore_are_accepted(job_id: str) -> None:
    assert only_job(parse_callback(body("json", job(job_id)))).job_id == job_id


# -- states, tags and events ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_job_keeps_code_and_message(fmt: str) -> None:
    detail = job(
        State="Failed",
        Code="InvalidParameter",
        Message="The audio file is damaged",
        Operation=operation(Output=None, NoiseReduction=None),
    )

    parsed = only_job(parse_callback(body(fmt, detail)))

    assert parsed.state == "Failed"
    assert not parsed.succeeded
    assert (parsed.code, parsed.message) == ("InvalidParameter", "The audio file is damaged")
    assert parsed.output is None


@pytest.mark.parametrize("state", ["Submitted", "Running", "Success", "Failed", "Pause", "Cancel"])
def test_every_documented_state_is_accepted(state: str) -> None:
    assert only_job(parse_callback(body("xml", job(State=state)))).state == state


@pytest.mark.parametrize("fmt", FORMATS)
def test_another_tag_is_parsed_as_is(fmt: str) -> None:
    detail = job(Tag="VoiceSeparate", Operation=operation(NoiseReduction=DROP, VoiceSeparate={"AudioMode": "IsAudio"}))
    parsed = only_job(parse_callback(body(fmt, detail)))
    assert parsed.tag == "VoiceSeparate"
    assert (parsed.format, parsed.sample_rate) == ("", "")


@pytest.mark.parametrize("fmt", FORMATS)
def test_workflow_finish_without_jobsdetail_has_no_jobs(fmt: str) -> None:
    extra = {"WorkflowExecution": {"RunId": WORKFLOW["RunId"], "State": "Success"}}
    assert parse_callback(body(fmt, event="WorkflowFinish", **extra)) == Callback("WorkflowFinish", (), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_other_event_with_jobsdetail_keeps_its_jobs(fmt: str) -> None:
    parsed = parse_callback(body(fmt, job(), event="WorkflowFinish"))
    assert parsed == Callback("WorkflowFinish", (DOC_JOB,), fmt)


# -- format detection ---------------------------------------------------------------------------------


def test_format_is_detected_from_the_body_not_a_header() -> None:
    # parse_callback sees no header at all: the first non-blank character decides.
    assert parse_callback(b'\n{"EventName": "WorkflowFinish"}').body_format == "json"
    assert parse_callback(b"\n<Response><EventName>WorkflowFinish</EventName></Response>").body_format == "xml"


def test_xml_cdata_text_is_read() -> None:
    text = b"<Response><EventName><![CDATA[WorkflowFinish]]></EventName></Response>"
    assert parse_callback(text) == Callback("WorkflowFinish", (), "xml")


def test_json_with_duplicate_keys_takes_the_last() -> None:
    text = b'{"EventName": "Ignored", "EventName": "WorkflowFinish"}'
    assert parse_callback(text).event_name == "WorkflowFinish"


# -- refusals -------------------------------------------------------------------------------------------


def test_bad_input_table_is_large_and_unique() -> None:
    ids = [case_id for case_id, _, _ in BAD_INPUTS]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 20


@pytest.mark.parametrize(("body_bytes", "message"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_with_exact_message(body_bytes: bytes, message: str) -> None:
    with pytest.raises(CallbackError) as raised:
        parse_callback(body_bytes)
    assert raised.value.message == message
    assert str(raised.value) == message
    assert raised.value.status == 400


def test_callback_error_defaults_to_400_and_is_a_value_error() -> None:
    error = CallbackError("x")
    assert (error.message, error.status) == ("x", 400)
    assert isinstance(error, ValueError)


def test_json_integer_longer_than_4300_digits_is_refused_as_callback_error() -> None:
    text = json.dumps({"EventName": "TaskFinish", "JobsDetail": job()}).encode()
    text = text.replace(b'"JobLevel": "0"', b'"JobLevel": 1' + b"0" * 5000)

    with pytest.raises(CallbackError) as raised:
        parse_callback(text)

    assert raised.value.status == 400


def test_xml_keeps_whitespace_in_values_like_describe_media_job_does() -> None:
    # The SDK parses DescribeMediaJob's XML without stripping; so must we, or verification
    # would reject a genuine job whose user data starts or ends with a space.
    doc = b"""<Response>
  <EventName>TaskFinish</EventName>
  <JobsDetail>
    <JobId>j1</JobId><Tag>NoiseReduction</Tag><State>Success</State>
    <Input>
      <BucketId>b-1</BucketId>
    </Input>
    <Operation>
      <UserData>  padded  </UserData>
      <NoiseReduction>
      </NoiseReduction>
    </Operation>
    <Message>
    </Message>
  </JobsDetail>
</Response>"""
    parsed = only_job(parse_callback(doc))
    assert parsed.user_data == "  padded  "
    assert parsed.input is not None
    assert parsed.input.bucket == "b-1"
    assert parsed.message == "\n    "
    assert parsed.format == ""
