"""A CreateMediaJobs request read into a :class:`MediaJob`, and the job as DescribeMediaJob reports it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit
from xml.parsers.expat import ExpatError

import xmltodict

from webhook.dev.sandbox.results import media_result
from webhook.models import JobState

TAG = "NoiseReduction"
MQ_REGIONS = ("sh", "bj", "gz", "cd", "hk")  # what CI documents for MqRegion
SAMPLE_RATES = ("8000", "12000", "16000", "24000", "32000", "44100", "48000")  # what CI accepts
_BEIJING = timezone(timedelta(hours=8))  # CI reports every time in UTC+8


class JobRequestError(ValueError):
    """A CreateMediaJobs request the sandbox refuses; ``code`` is the CI error code (HTTP 400)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class MqTarget:
    """Where a TDMQ callback goes: ``CallBackMqConfig``'s MqRegion, MqMode and MqName."""

    region: str
    mode: str
    name: str


@dataclass
class MediaJob:
    """A NoiseReduction job; mutable fields change under :class:`MediaJobs`' lock."""

    job_id: str
    bucket: str
    region: str
    input_key: str
    format: str
    sample_rate: str  # "" keeps the input's rate
    output_bucket: str
    output_region: str
    output_key: str
    user_data: str
    job_level: str
    callback_url: str  # "" for no callback
    callback_format: str  # "json" or "xml"
    queue_id: str
    creation_time: str
    state: JobState = JobState.SUBMITTED
    code: str = "Success"
    message: str = ""
    start_time: str = "-"
    end_time: str = "-"
    callback_mq: MqTarget | None = None  # a TDMQ callback instead of callback_url
    written_key: str = ""  # output_key with its placeholders resolved, once written
    written_md5: str = ""
    written_info: dict[str, Any] | None = None  # CI's MediaInfo of what was written

    def detail(self, results: bool = True) -> dict[str, Any]:
        """The job as DescribeMediaJob's ``JobsDetail`` element (same keys in XML and JSON); without
        ``results``, as a CI that reports no ``MediaResult`` or ``MediaInfo`` gives it."""
        operation: dict[str, Any] = {
            "NoiseReduction": {"Format": self.format, "SampleRate": self.sample_rate},
            # As submitted: CI reports the name it wrote only in MediaResult.
            "Output": {"Bucket": self.output_bucket, "Object": self.output_key, "Region": self.output_region},
            "UserData": self.user_data,
            "JobLevel": self.job_level,
        }
        if self.written_key and results:
            operation["MediaInfo"] = self.written_info
            operation["MediaResult"] = media_result(
                self.output_bucket, self.output_region, self.written_key, self.written_md5
            )
        return {
            "Code": self.code,
            "CreationTime": self.creation_time,
            "EndTime": self.end_time,
            "Input": {"BucketId": self.bucket, "Object": self.input_key, "Region": self.region},
            "JobId": self.job_id,
            "Message": self.message,
            "Operation": operation,
            "QueueId": self.queue_id,
            "QueueType": "Speeching",
            "StartTime": self.start_time,
            "State": self.state.value,
            "Progress": "100" if self.state.finished else "0",
            "SubTag": None,
            "Tag": TAG,
        }


def mq_target(config: Any, where: str) -> MqTarget:
    """A ``CallBackMqConfig`` (or a NotifyConfig's Mq fields); the sandbox delivers to queues only."""
    config = config if isinstance(config, dict) else {}
    target = MqTarget(_text(config, "MqRegion"), _text(config, "MqMode") or "Queue", _text(config, "MqName"))
    if target.region not in MQ_REGIONS:
        raise JobRequestError("InvalidArgument", f"{where}.MqRegion must be one of {', '.join(MQ_REGIONS)}")
    if target.mode == "Topic":
        raise JobRequestError("InvalidArgument", f"{where}.MqMode Topic: the sandbox delivers to queues only")
    if target.mode != "Queue":
        raise JobRequestError("InvalidArgument", f"{where}.MqMode must be Queue or Topic, not {target.mode!r}")
    if not target.name:
        raise JobRequestError("InvalidArgument", f"{where}.MqName is required for a TDMQ callback")
    return target


def new_job(
    body: bytes, *, bucket: str, region: str, queue_id: str, queue_notify: tuple[str | MqTarget, str] | None = None
) -> MediaJob:
    """A Submitted job from a CreateMediaJobs request body; raise :class:`JobRequestError` if it is unusable.

    ``queue_notify`` is the queue's (Url or TDMQ queue, ResultFormat): where a job that names no
    CallBack calls back. ``CallBackType: TDMQ`` with ``CallBackMqConfig`` puts the callback document
    on that CMQ queue instead of POSTing it.
    """
    try:
        doc = xmltodict.parse(body, disable_entities=True)
    except (ExpatError, ValueError) as exc:
        raise JobRequestError("MalformedXML", f"the request body is not well-formed XML ({exc})") from None
    request = doc.get("Request")
    if not isinstance(request, dict):
        raise JobRequestError("MalformedXML", "the request body must be a <Request> element")
    tag = _text(request, "Tag")
    if tag != TAG:
        raise JobRequestError("InvalidArgument", f"Tag {tag!r} is not supported: the sandbox runs only {TAG} jobs")
    if _text(request, "QueueId") not in ("", queue_id):
        raise JobRequestError("InvalidArgument", f"QueueId must be this bucket's queue, {queue_id}")
    if template_id := _text(request, "Operation", "TemplateId"):
        raise JobRequestError(
            "InvalidArgument", f"TemplateId {template_id!r} does not exist: the sandbox has no templates"
        )
    noise = ("Operation", "NoiseReduction")
    output = ("Operation", "Output")
    job_format = (_text(request, *noise, "Format") or "wav").lower()
    if job_format != "wav":
        raise JobRequestError("InvalidArgument", f"Format {job_format!r} is not supported: the sandbox writes only wav")
    sample_rate = _text(request, *noise, "SampleRate")
    if sample_rate and sample_rate not in SAMPLE_RATES:
        raise JobRequestError("InvalidArgument", f"SampleRate must be one of {', '.join(SAMPLE_RATES)}")
    callback_type = _text(request, "CallBackType") or "Url"
    if callback_type not in ("Url", "TDMQ"):
        raise JobRequestError("InvalidArgument", f"CallBackType must be Url or TDMQ, not {callback_type!r}")
    callback, default_format = _text(request, "CallBack"), "XML"
    mq = mq_target(request.get("CallBackMqConfig"), "CallBackMqConfig") if callback_type == "TDMQ" else None
    if callback == "no":  # CI's way to say "no callback for this job, not even the queue's"
        callback, mq = "", None
    elif not callback and mq is None and queue_notify is not None:
        destination, default_format = queue_notify
        callback, mq = ("", destination) if isinstance(destination, MqTarget) else (destination, None)
    if mq is not None:
        callback = ""  # CI sends the document to the queue instead
    callback_format = (_text(request, "CallBackFormat") or default_format).upper()
    if callback_format not in ("JSON", "XML"):
        raise JobRequestError("InvalidArgument", "CallBackFormat must be JSON or XML")
    if callback and urlsplit(callback).scheme not in ("http", "https"):
        raise JobRequestError("InvalidArgument", "CallBack must be an http:// or https:// URL")
    return MediaJob(
        job_id="j" + uuid.uuid4().hex,
        bucket=bucket,
        region=region,
        input_key=_required(request, "Input", "Object"),
        format=job_format,
        sample_rate=sample_rate,
        output_bucket=_required(request, *output, "Bucket"),
        output_region=_required(request, *output, "Region"),
        output_key=_required(request, *output, "Object"),
        user_data=_text(request, "Operation", "UserData"),
        job_level=_text(request, "Operation", "JobLevel") or "0",
        callback_url=callback,
        callback_format=callback_format.lower(),
        queue_id=queue_id,
        creation_time=ci_time(),
        callback_mq=mq,
    )


def _text(container: dict[str, Any], *path: str) -> str:
    value: Any = container
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) else ""


def _required(container: dict[str, Any], *path: str) -> str:
    value = _text(container, *path)
    if not value:
        raise JobRequestError("InvalidArgument", f"{'.'.join(('Request', *path))} is required")
    return value


def ci_time() -> str:
    return datetime.now(_BEIJING).strftime("%Y-%m-%dT%H:%M:%S%z")
