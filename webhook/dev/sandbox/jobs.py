"""The CI side of the sandbox: NoiseReduction jobs, their processing, and their callbacks."""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit
from xml.parsers.expat import ExpatError

import requests
import xmltodict

from webhook.dev.sandbox.audio import AudioError, reduce_noise
from webhook.dev.sandbox.results import CallbackShape, media_info, media_result, resolve_output, shaped
from webhook.dev.sandbox.store import NoSuchKey, ObjectStore, read_chunks
from webhook.models import JobState

log = logging.getLogger(__name__)

TAG = "NoiseReduction"
MQ_REGIONS = ("sh", "bj", "gz", "cd", "hk")  # what CI documents for MqRegion
SAMPLE_RATES = ("8000", "12000", "16000", "24000", "32000", "44100", "48000")  # what CI accepts
_CALLBACK_RETRY_DELAYS = (0.2, 0.5, 1.0)  # seconds to wait before each retry of a failed callback
_CALLBACK_TIMEOUT = 10.0
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


@dataclass(frozen=True)
class SentCallback:
    """One callback delivery, after its retries (a TDMQ one: ``url`` ``tdmq://<region>/<queue>``, 200 once queued)."""

    job_id: str
    url: str
    format: str  # "json" or "xml"
    status_code: int | None  # of the last attempt; None when no response came back
    body: bytes
    attempts: int


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

    def detail(self) -> dict[str, Any]:
        """The job as DescribeMediaJob's ``JobsDetail`` element (same keys in XML and JSON)."""
        operation: dict[str, Any] = {
            "NoiseReduction": {"Format": self.format, "SampleRate": self.sample_rate},
            # As submitted: CI reports the name it wrote only in MediaResult.
            "Output": {"Bucket": self.output_bucket, "Object": self.output_key, "Region": self.output_region},
            "UserData": self.user_data,
            "JobLevel": self.job_level,
        }
        if self.written_key:
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
        creation_time=_now(),
        callback_mq=mq,
    )


class MediaJobs:
    """Runs jobs in background threads against ``store``, and POSTs their callbacks from threads of their own.

    As in CI, a callback URL that is down (retried with waits) can hold up other callbacks at most,
    never the processing of other jobs.
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        job_delay: float = 0.0,
        tdmq: Callable[[str, str], str] | None = None,
        callback_shape: CallbackShape = CallbackShape.FULL,
    ) -> None:
        self.callback_shape = callback_shape
        """How callbacks state the job's locations (see :class:`~webhook.dev.sandbox.results.CallbackShape`)."""
        self._store = store
        self._job_delay = job_delay
        self._tdmq = tdmq  # puts a message on a CMQ queue: (queue name, body) -> msgId
        self._jobs: dict[str, MediaJob] = {}
        self._sent: list[SentCallback] = []
        self._lock = threading.Lock()
        self._sent_changed = threading.Condition(self._lock)
        self._closing = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sandbox-ci")
        self._callbacks = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sandbox-callback")

    def submit(self, job: MediaJob) -> dict[str, Any]:
        """Queue ``job``; return its ``JobsDetail`` as submitted."""
        with self._lock:
            self._jobs[job.job_id] = job
            detail = job.detail()
        self._pool.submit(self._run, job)
        return detail

    def describe(self, bucket: str, job_ids: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
        """The details of the jobs of ``bucket`` among ``job_ids``, and the ids that are not among them."""
        details, missing = [], []
        with self._lock:
            for job_id in job_ids:
                job = self._jobs.get(job_id)
                if job is not None and job.bucket == bucket:
                    details.append(job.detail())
                else:
                    missing.append(job_id)
        return details, missing

    def details(self, bucket: str) -> list[dict[str, Any]]:
        """The details of every job of ``bucket``, in the order they were submitted."""
        with self._lock:
            return [job.detail() for job in self._jobs.values() if job.bucket == bucket]

    @property
    def callbacks_sent(self) -> list[SentCallback]:
        with self._lock:
            return list(self._sent)

    def wait_for_callbacks(self, n: int, timeout: float) -> list[SentCallback]:
        """Block until at least ``n`` callbacks were sent; raise :class:`TimeoutError` after ``timeout`` s."""
        with self._sent_changed:
            if not self._sent_changed.wait_for(lambda: len(self._sent) >= n, timeout):
                raise TimeoutError(f"{len(self._sent)} of {n} callbacks were sent within {timeout} s")
            return list(self._sent)

    def close(self) -> None:
        """Drop queued jobs and callbacks, cut delays and retry waits short, and wait for running ones."""
        self._closing.set()
        # Jobs first: a job that is finishing still hands its callback over.
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._callbacks.shutdown(wait=True, cancel_futures=True)

    def _run(self, job: MediaJob) -> None:
        with self._lock:
            job.state, job.start_time = JobState.RUNNING, _now()
        if self._closing.wait(self._job_delay):
            return
        try:
            self._reduce_noise(job)
        except NoSuchKey:
            self._finish(job, "InputObjectNotExist", f"the input object {job.input_key!r} does not exist")
        except AudioError as exc:
            self._finish(job, "InvalidInputFile", str(exc))
        except Exception as exc:  # a job must end Failed, never stay Running
            log.exception("sandbox job %s failed", job.job_id)
            self._finish(job, "InternalError", f"{type(exc).__name__}: {exc}")
        else:
            self._finish(job)
        if job.callback_url or job.callback_mq:
            self._callbacks.submit(self._send_callback, job)

    def _reduce_noise(self, job: MediaJob) -> None:
        _, source = self._store.open(job.bucket, job.input_key)
        key = resolve_output(job.output_key, job.input_key, job.format)
        with source, tempfile.TemporaryFile() as target:
            reduce_noise(source, target, int(job.sample_rate) if job.sample_rate else None)
            target.seek(0)
            written = self._store.put(job.output_bucket, key, read_chunks(target), "audio/wav")
            target.seek(0)
            info = media_info(target, written.size)
        with self._lock:
            job.written_key, job.written_md5, job.written_info = key, written.md5, info

    def _finish(self, job: MediaJob, code: str = "", message: str = "") -> None:
        """Mark ``job`` Success, or Failed with the error ``code`` and ``message``."""
        with self._lock:
            job.state = JobState.FAILED if code else JobState.SUCCESS
            job.code, job.message, job.end_time = code or "Success", message, _now()

    def _send_callback(self, job: MediaJob) -> None:
        with self._lock:
            event = {"EventName": "TaskFinish", "JobsDetail": shaped(job.detail(), self.callback_shape)}
        if job.callback_format == "json":
            body, content_type = json.dumps(event).encode(), "application/json"
        else:
            body, content_type = (
                xmltodict.unparse({"Response": event}, short_empty_elements=True).encode(),
                "application/xml",
            )
        status: int | None = None
        attempts = 0
        if job.callback_mq is not None:
            url = f"tdmq://{job.callback_mq.region}/{job.callback_mq.name}"
            status, attempts = self._enqueue(job, body), 1
        else:
            url = job.callback_url
            for delay in (*_CALLBACK_RETRY_DELAYS, None):
                attempts += 1
                status = _post(url, body, content_type)
                if (status is not None and 200 <= status < 300) or delay is None or self._closing.wait(delay):
                    break
        sent = SentCallback(job.job_id, url, job.callback_format, status, body, attempts)
        with self._sent_changed:
            self._sent.append(sent)
            self._sent_changed.notify_all()

    def _enqueue(self, job: MediaJob, body: bytes) -> int | None:
        assert job.callback_mq is not None
        if self._tdmq is None:
            log.warning("sandbox job %s: no TDMQ to send its callback to", job.job_id)
            return None
        try:
            self._tdmq(job.callback_mq.name, body.decode())
        except Exception:
            log.exception("sandbox job %s: its callback could not be queued", job.job_id)
            return None
        return 200


def _post(url: str, body: bytes, content_type: str) -> int | None:
    try:
        with requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=_CALLBACK_TIMEOUT) as r:
            return r.status_code
    except requests.RequestException as exc:
        log.warning("sandbox callback to %s failed: %s", url, exc)
        return None


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


def _now() -> str:
    return datetime.now(_BEIJING).strftime("%Y-%m-%dT%H:%M:%S%z")
