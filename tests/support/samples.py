"""Callback bodies for the parser and endpoint tests: the documented sample, builders, and bad inputs.

``job()`` returns one ``JobsDetail`` element shaped like Tencent's "Task Callback" example for
audio noise reduction; ``body()`` wraps jobs into a callback in either format. The builders
write what they are given, so a test can put any shape (lists, ``None`` for an empty XML
element, unknown containers) anywhere.
"""

from __future__ import annotations

import copy
import json
from typing import Any
from xml.sax.saxutils import escape

from webhook.models import Job, ObjectLocation

JOB_ID = "j035aca66f86211ec8a5a87e016101404"
FORMATS = ("xml", "json")

# The example from the Tencent docs, byte for byte as CI sends it.
DOC_XML = (
    b"<Response><EventName>TaskFinish</EventName><JobsDetail><Code>Success</Code>"
    b"<CreationTime>2022-06-30T18:47:18+0800</CreationTime><EndTime>2022-06-30T18:47:30+0800</EndTime>"
    b"<Input><BucketId>test-123456789</BucketId><Object>input/demo.mp3</Object><Region>ap-chongqing</Region></Input>"
    b"<JobId>j035aca66f86211ec8a5a87e016101404</JobId><Message>SUCCESS</Message><Operation><Output>"
    b"<Bucket>test-123456789</Bucket><Object>output/nr.wav</Object><Region>ap-chongqing</Region></Output>"
    b"<UserData>This is my NoiseReduction job.</UserData><NoiseReduction><Format>wav</Format>"
    b"<SampleRate>16000</SampleRate></NoiseReduction><JobLevel>0</JobLevel><TemplateId/><TemplateName/>"
    b"</Operation><QueueId>p2242ab62c7c94486915508540933a2c6</QueueId><QueueType>Speeching</QueueType>"
    b"<StartTime>2022-06-30T18:47:20+0800</StartTime><State>Success</State><Tag>NoiseReduction</Tag>"
    b"</JobsDetail></Response>"
)
DOC_JSON = (
    b'{"EventName":"TaskFinish","JobsDetail":{"Code":"Success","CreationTime":"2022-06-30T18:47:18+0800",'
    b'"EndTime":"2022-06-30T18:47:30+0800","Input":{"BucketId":"test-123456789","Object":"input/demo.mp3",'
    b'"Region":"ap-chongqing"},"JobId":"j035aca66f86211ec8a5a87e016101404","Message":"SUCCESS",'
    b'"Operation":{"Output":{"Bucket":"test-123456789","Object":"output/nr.wav","Region":"ap-chongqing"},'
    b'"UserData":"This is my NoiseReduction job.","NoiseReduction":{"Format":"wav","SampleRate":"16000"},'
    b'"JobLevel":"0","TemplateId":"","TemplateName":""},"QueueId":"p2242ab62c7c94486915508540933a2c6",'
    b'"QueueType":"Speeching","StartTime":"2022-06-30T18:47:20+0800","State":"Success","Tag":"NoiseReduction"}}'
)

# What both documented samples parse to.
DOC_JOB = Job(
    job_id=JOB_ID,
    tag="NoiseReduction",
    state="Success",
    code="Success",
    message="SUCCESS",
    creation_time="2022-06-30T18:47:18+0800",
    start_time="2022-06-30T18:47:20+0800",
    end_time="2022-06-30T18:47:30+0800",
    queue_id="p2242ab62c7c94486915508540933a2c6",
    queue_type="Speeching",
    input=ObjectLocation(bucket="test-123456789", region="ap-chongqing", key="input/demo.mp3"),
    output=ObjectLocation(bucket="test-123456789", region="ap-chongqing", key="output/nr.wav"),
    user_data="This is my NoiseReduction job.",
    job_level="0",
    template_id="",
    template_name="",
    format="wav",
    sample_rate="16000",
)

_DOC_DETAIL: dict[str, Any] = json.loads(DOC_JSON)["JobsDetail"]

DROP = object()  # a value for job()/body() that removes the key
_MISSING = object()


def job(job_id: Any = JOB_ID, **changes: Any) -> dict[str, Any]:
    """The documented ``JobsDetail`` element with its JobId (any value) and top-level keys replaced.

    ``DROP`` as a value removes the key.
    """
    detail = copy.deepcopy(_DOC_DETAIL)
    detail["JobId"] = job_id
    for key, value in changes.items():
        if value is DROP:
            detail.pop(key, None)
        else:
            detail[key] = value
    return detail


def operation(**changes: Any) -> dict[str, Any]:
    """The documented ``Operation`` container with keys replaced (``DROP`` removes one)."""
    op: dict[str, Any] = job()["Operation"]
    for key, value in changes.items():
        if value is DROP:
            op.pop(key, None)
        else:
            op[key] = value
    return op


def body(fmt: str, jobs: Any = _MISSING, event: str = "TaskFinish", **extra: Any) -> bytes:
    """A callback in ``fmt`` ("xml" or "json"); ``jobs`` is one element, a list, or absent.

    A list becomes a JSON array or repeated ``<JobsDetail>`` elements; a single dict becomes a
    JSON object or one ``<JobsDetail>``. ``extra`` adds top-level fields after ``JobsDetail``.
    """
    doc: dict[str, Any] = {"EventName": event}
    if jobs is not _MISSING:
        doc["JobsDetail"] = jobs
    doc.update(extra)
    if fmt == "json":
        return json.dumps(doc, ensure_ascii=False).encode()
    if fmt == "xml":
        return to_xml("Response", doc).encode()
    raise ValueError(fmt)


def to_xml(tag: str, value: Any) -> str:
    """Serialize like CI: a dict's keys become child elements, a list repeats its element."""
    if isinstance(value, list):
        return "".join(to_xml(tag, item) for item in value)
    if value is None:
        return f"<{tag}/>"
    if isinstance(value, dict):
        inner = "".join(to_xml(key, item) for key, item in value.items())
        return f"<{tag}>{inner}</{tag}>"
    return f"<{tag}>{escape(str(value))}</{tag}>"


def json_doc(jobs: Any, event: str = "TaskFinish", **extra: Any) -> bytes:
    return body("json", jobs, event, **extra)


def _jobs(count: int) -> list[dict[str, Any]]:
    return [job(f"j{n:032x}") for n in range(count)]


_WHERE = "JobsDetail[0]"
_STATES = "Submitted, Running, Success, Failed, Pause, Cancel"
_DTD_REFUSED = "XML with a DOCTYPE or entity declaration is not accepted"

# (id, body, the exact CallbackError message); every one is answered 400 and stores nothing.
BAD_INPUTS: list[tuple[str, bytes, str]] = [
    ("empty-body", b"", "body is empty"),
    ("whitespace-only", b" \r\n\t ", "body is empty"),
    ("plain-text", b"TaskFinish j035aca66f86211ec8a5a87e016101404", "body is neither JSON nor XML"),
    ("form-encoded", b"EventName=TaskFinish&JobId=j1", "body is neither JSON nor XML"),
    ("bom-only", b"\xef\xbb\xbf", "body is neither JSON nor XML"),
    ("json-string-top-level", b'"TaskFinish"', "body is neither JSON nor XML"),
    ("invalid-utf8", b'{"EventName": "Task\xffFinish"}', "body is not valid UTF-8 (byte 19)"),
    ("utf16", '{"EventName": "TaskFinish"}'.encode("utf-16"), "body is not valid UTF-8 (byte 0)"),
    ("malformed-json", b'{"EventName": }', "malformed JSON: Expecting value at line 1 column 15"),
    (
        "truncated-json",
        DOC_JSON[:40],
        "malformed JSON: Expecting property name enclosed in double quotes at line 1 column 41",
    ),
    ("json-trailing-garbage", b'{"EventName": "WorkflowFinish"} x', "malformed JSON: Extra data at line 1 column 33"),
    ("json-array-top-level", b'[{"EventName": "TaskFinish"}]', "JSON body must be an object"),
    ("json-deeply-nested", b"[" * 100_000, "JSON is nested too deeply"),
    ("json-object-deeply-nested", b'{"a":' * 100_000, "JSON is nested too deeply"),
    (
        "malformed-xml",
        b"<Response><EventName>TaskFinish</Response>",
        "malformed XML: mismatched tag: line 1, column 33",
    ),
    ("xml-two-roots", b"<Response/><Response/>", "malformed XML: junk after document element: line 1, column 11"),
    (
        "xml-undefined-entity",
        b"<Response><EventName>&x;</EventName></Response>",
        "malformed XML: undefined entity: line 1, column 21",
    ),
    (
        "wrong-xml-root",
        b"<Request><EventName>TaskFinish</EventName></Request>",
        "XML root element must be <Response>, not <Request>",
    ),
    ("xml-empty-response", b"<Response/>", "<Response> is empty"),
    ("xml-response-text-only", b"<Response>TaskFinish</Response>", "<Response> is empty"),
    (
        "xml-billion-laughs",
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
        b'<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
        b"<Response><EventName>&lol3;</EventName></Response>",
        _DTD_REFUSED,
    ),
    (
        "xml-external-entity",
        b'<?xml version="1.0"?><!DOCTYPE Response [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
        b"<Response><EventName>TaskFinish</EventName><JobsDetail><JobId>&xxe;</JobId></JobsDetail></Response>",
        _DTD_REFUSED,
    ),
    (
        "xml-external-dtd",
        b'<!DOCTYPE Response SYSTEM "http://127.0.0.1:9/evil.dtd"><Response><EventName>x</EventName></Response>',
        _DTD_REFUSED,
    ),
    ("json-missing-eventname", json_doc(job()).replace(b'"EventName": "TaskFinish", ', b""), "missing EventName"),
    ("xml-missing-eventname", b"<Response><JobsDetail><JobId>j1</JobId></JobsDetail></Response>", "missing EventName"),
    ("empty-eventname", json_doc(job(), event=""), "missing EventName"),
    ("json-taskfinish-without-jobsdetail", b'{"EventName": "TaskFinish"}', "missing JobsDetail"),
    ("xml-taskfinish-without-jobsdetail", body("xml", event="TaskFinish"), "missing JobsDetail"),
    ("json-jobsdetail-null", b'{"EventName": "TaskFinish", "JobsDetail": null}', "missing JobsDetail"),
    ("empty-jobsdetail-array", json_doc([]), "JobsDetail is empty"),
    ("jobsdetail-element-string", json_doc(["j035aca66f86211ec8a5a87e016101404"]), f"{_WHERE} must be an object"),
    ("jobsdetail-string", json_doc("j035aca66f86211ec8a5a87e016101404"), f"{_WHERE} must be an object"),
    ("second-jobsdetail-element-number", json_doc([job(), 7]), "JobsDetail[1] must be an object"),
    ("xml-empty-jobsdetail", body("xml", None), "JobsDetail is empty"),
    ("xml-jobsdetail-text", body("xml", "j035aca66f86211ec8a5a87e016101404"), f"{_WHERE} must be an object"),
    ("json-missing-jobid", json_doc(job(JobId=DROP)), f"{_WHERE}: missing JobId"),
    ("xml-missing-jobid", body("xml", job(JobId=DROP)), f"{_WHERE}: missing JobId"),
    ("empty-jobid", json_doc(job("")), f"{_WHERE}: missing JobId"),
    (
        "jobid-path-traversal",
        json_doc(job("../../etc/passwd")),
        f"{_WHERE}.JobId must be 1 to 128 letters, digits, '-' or '_'",
    ),
    (
        "jobid-with-space",
        body("xml", job("j035 aca66")),
        f"{_WHERE}.JobId must be 1 to 128 letters, digits, '-' or '_'",
    ),
    ("jobid-200-chars", json_doc(job("j" * 200)), f"{_WHERE}.JobId must be 1 to 128 letters, digits, '-' or '_'"),
    ("jobid-non-ascii", json_doc(job("j任务")), f"{_WHERE}.JobId must be 1 to 128 letters, digits, '-' or '_'"),
    ("jobid-boolean", json_doc(job(True)), f"{_WHERE}.JobId must be a string"),
    ("jobid-object", json_doc(job({"Id": "j1"})), f"{_WHERE}.JobId must be a string"),
    ("xml-jobid-with-child", body("xml", job({"Id": "j1"})), f"{_WHERE}.JobId must be a string"),
    ("xml-jobid-repeated", body("xml", job(["j1", "j2"])), f"{_WHERE}.JobId must be a string"),
    ("missing-tag", json_doc(job(Tag=DROP)), f"{_WHERE}: missing Tag"),
    ("xml-empty-tag", body("xml", job(Tag=None)), f"{_WHERE}: missing Tag"),
    ("bad-state", json_doc(job(State="Done")), f"{_WHERE}.State must be one of {_STATES}, not 'Done'"),
    ("missing-state", body("xml", job(State=DROP)), f"{_WHERE}.State must be one of {_STATES}, not ''"),
    ("lowercase-state", json_doc(job(State="success")), f"{_WHERE}.State must be one of {_STATES}, not 'success'"),
    ("operation-string", json_doc(job(Operation="NoiseReduction")), f"{_WHERE}.Operation must be an object"),
    ("xml-operation-text", body("xml", job(Operation="NoiseReduction")), f"{_WHERE}.Operation must be an object"),
    ("input-list", json_doc(job(Input=[])), f"{_WHERE}.Input must be an object"),
    (
        "output-list",
        json_doc(job(Operation=operation(Output=[{"Bucket": "b"}]))),
        f"{_WHERE}.Operation.Output must be an object",
    ),
    (
        "xml-output-repeated",
        body("xml", job(Operation=operation(Output=[{"Bucket": "a"}, {"Bucket": "b"}]))),
        f"{_WHERE}.Operation.Output must be an object",
    ),
    (
        "noisereduction-string",
        json_doc(job(Operation=operation(NoiseReduction="wav"))),
        f"{_WHERE}.Operation.NoiseReduction must be an object",
    ),
    (
        "samplerate-object",
        json_doc(job(Operation=operation(NoiseReduction={"SampleRate": {"Hz": 16000}}))),
        f"{_WHERE}.Operation.NoiseReduction.SampleRate must be a string",
    ),
    (
        "cosheaders-element-string",
        json_doc(job(Input={"BucketId": "b", "CosHeaders": ["x-cos-meta-a: 1"]})),
        f"{_WHERE}.Input.CosHeaders[0] must be an object",
    ),
    (
        "xml-cosheaders-second-element-text",
        body("xml", job(Input={"BucketId": "b", "CosHeaders": [{"Key": "a", "Value": "1"}, "text"]})),
        f"{_WHERE}.Input.CosHeaders[1] must be an object",
    ),
    ("workflow-string", json_doc(job(Workflow="wf")), f"{_WHERE}.Workflow must be an object"),
    ("message-list", json_doc(job(Message=["a", "b"])), f"{_WHERE}.Message must be a string"),
    ("code-null-in-list", json_doc(job(Code=[None])), f"{_WHERE}.Code must be a string"),
    ("field-4097-chars", json_doc(job(Message="m" * 4097)), f"{_WHERE}.Message is longer than 4096 characters"),
    (
        "xml-userdata-4097-chars",
        body("xml", job(Operation=operation(UserData="u" * 4097))),
        f"{_WHERE}.Operation.UserData is longer than 4096 characters",
    ),
    ("json-101-jobs", json_doc(_jobs(101)), "JobsDetail has 101 jobs; at most 100 are accepted"),
    ("xml-101-jobs", body("xml", _jobs(101)), "JobsDetail has 101 jobs; at most 100 are accepted"),
    (
        "second-job-bad",
        json_doc([job(), job("j2", State="Done")]),
        f"JobsDetail[1].State must be one of {_STATES}, not 'Done'",
    ),
    ("json-nul-in-tag", json_doc(job(Tag="Noise\u0000Reduction")), f"{_WHERE}.Tag contains a NUL character"),
    ("json-nul-in-event", json_doc(job(), event="Task\u0000Finish"), "EventName contains a NUL character"),
]


def numbered_job(n: int, tag: str = "NoiseReduction", state: str = "Success") -> Job:
    """A small job with its own id (``n``) and output key, for ledger tests."""
    return Job(
        job_id=f"j{n:032x}",
        tag=tag,
        state=state,
        input=ObjectLocation("b-1", "ap-guangzhou", "in.wav"),
        output=ObjectLocation("b-1", "ap-guangzhou", f"out/{n}.wav"),
    )
