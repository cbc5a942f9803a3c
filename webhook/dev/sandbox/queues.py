"""The sandbox's Speeching queues: DescribeSpeechQueues (``GET /asrqueue``) and UpdateSpeechQueue
(``PUT /asrqueue/<QueueId>``), as cos-python-sdk-v5's ``ci_get_asr_queue`` and
``ci_update_asr_queue`` send them.

Each bucket has one queue, created on first use, whose QueueId is derived from the APPID and the
bucket, so it stays the same across restarts. NoiseReduction jobs run on it. While its
``NotifyConfig`` is ``State=On`` with ``Type=Url`` and ``TaskFinish`` among its events, a job
submitted without a ``CallBack`` of its own calls back to the queue's ``Url`` in its
``ResultFormat`` (a job's own ``CallBackFormat`` wins, as CI documents). The queue's notification
is taken when the job is submitted.

What CI documents and the sandbox follows: the query parameters ``queueIds``, ``state``
(``All``, ``Active``, ``Paused``), ``pageNumber`` and ``pageSize`` (default 1 and 10); the answer's
``TotalCount``, ``PageNumber``, ``PageSize``, ``QueueList`` and ``NonExistPIDs``; the update's
required ``Name`` (at most 128 of letters, digits, CJK, ``_``, ``-``, ``*``), ``State`` and
``NotifyConfig`` (``State`` ``On``/``Off``, default ``Off``; ``Type`` and ``Event`` required when
``On``; ``ResultFormat`` ``XML``/``JSON``, default ``XML``), answered with ``<Queue>``.

Not confirmed against CI, so chosen here: the error code for an unknown QueueId (400
``InvalidArgument``); that an update replaces the whole ``NotifyConfig``; whether CI reads the
queue's notification at submission or when the job ends; that a ``TDMQ`` notification answers its
``MqRegion``, ``MqMode`` and ``MqName`` in ``NotifyConfig`` (shown only when set). A ``TDMQ``
notification puts the callback document on the sandbox's CMQ queue ``MqName`` (any ``MqRegion``
of CI's five reaches the one sandbox CMQ). Not served: pausing a queue (501 ``NotImplemented``),
since the sandbox runs every job at once, and ``MqMode`` ``Topic``.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import IO, Any
from urllib.parse import urlsplit
from xml.parsers.expat import ExpatError

import xmltodict

from webhook.dev.sandbox.responses import ApiError
from webhook.dev.sandbox.signing import FIELDS
from webhook.dev.sandbox.submission import JobRequestError, MqTarget, mq_target

QUEUE_PATH = "asrqueue"
PARAMETERS = frozenset({"queueIds", "state", "pageNumber", "pageSize"})
EVENTS = frozenset({"TaskFinish", "WorkflowFinish"})
MAX_PAGE_SIZE = 100
_QUEUE_ID = re.compile(r"p[0-9a-f]{32}")
_NAME = re.compile(r"[0-9A-Za-z_\-*\u4e00-\u9fff]{1,128}")
_MAX_BODY = 16 * 1024
_BEIJING = timezone(timedelta(hours=8))  # CI reports every time in UTC+8


def is_queue_update(key: str) -> bool:
    """Whether a PUT of ``key`` is UpdateSpeechQueue rather than an object upload.

    Through a bucket's COS host (how the SDK sends CI calls with ``CosConfig(IP=...)``) the two
    share a path; only keys shaped like a QueueId are taken, so other uploads under ``asrqueue/``
    still land as objects.
    """
    queue_id = key.removeprefix(QUEUE_PATH + "/")
    return queue_id != key and _QUEUE_ID.fullmatch(queue_id) is not None


@dataclass
class Notify:
    """A queue's ``NotifyConfig``."""

    state: str = "Off"
    url: str = ""
    type: str = "Url"
    event: str = "TaskFinish"
    result_format: str = "XML"
    mq: MqTarget | None = None  # with Type TDMQ

    def detail(self) -> dict[str, str]:
        mq = {"MqMode": self.mq.mode, "MqName": self.mq.name, "MqRegion": self.mq.region} if self.mq else {}
        return {
            "Url": self.url,
            "Event": self.event,
            "Type": self.type,
            "State": self.state,
            "ResultFormat": self.result_format,
        } | mq


@dataclass
class SpeechQueue:
    queue_id: str
    name: str
    create_time: str
    update_time: str
    state: str = "Active"
    notify: Notify = field(default_factory=Notify)

    def detail(self) -> dict[str, Any]:
        """The queue as CI's ``QueueList`` / ``Queue`` element."""
        return {
            "QueueId": self.queue_id,
            "Name": self.name,
            "State": self.state,
            "NotifyConfig": self.notify.detail(),
            "MaxSize": "10000",
            "MaxConcurrent": "10",
            "UpdateTime": self.update_time,
            "CreateTime": self.create_time,
            "Category": "Speeching",
        }


class SpeechQueues:
    """The Speeching queue of every bucket of one APPID."""

    def __init__(self, appid: str) -> None:
        self._appid = appid
        self._queues: dict[str, SpeechQueue] = {}
        self._lock = threading.Lock()

    def queue_id(self, bucket: str) -> str:
        return "p" + hashlib.sha256(f"{self._appid}/{bucket}".encode()).hexdigest()[:32]

    def notification(self, bucket: str) -> tuple[str | MqTarget, str] | None:
        """The (Url or TDMQ queue, ResultFormat) that jobs without a CallBack call back to, or None if none."""
        with self._lock:
            notify = self._queue(bucket).notify
            if notify.state != "On" or "TaskFinish" not in notify.event.split(","):
                return None
            if notify.type == "TDMQ" and notify.mq is not None:
                return notify.mq, notify.result_format
            if notify.type != "Url" or not notify.url:
                return None
            return notify.url, notify.result_format

    def call(self, method: str, bucket: str, key: str, params: Mapping[str, str], body: IO[bytes]) -> dict[str, Any]:
        """The ``<Response>`` of a queue call on ``key`` (``asrqueue`` or ``asrqueue/<id>``)."""
        if method == "GET" and key == QUEUE_PATH:
            return self._describe(bucket, params)
        if method == "PUT" and key.startswith(QUEUE_PATH + "/"):
            names = sorted(name for name in params if name not in FIELDS)
            if names:
                raise ApiError(501, "NotImplemented", f"UpdateSpeechQueue has no parameter {', '.join(names)}")
            data = body.read(_MAX_BODY + 1)
            if len(data) > _MAX_BODY:
                raise ApiError(400, "InvalidArgument", f"the request body is larger than {_MAX_BODY} bytes")
            return self._update(bucket, key[len(QUEUE_PATH) + 1 :], data)
        raise ApiError(
            501, "NotImplemented", "the sandbox's queue API has GET /asrqueue and PUT /asrqueue/<QueueId> only"
        )

    def _queue(self, bucket: str) -> SpeechQueue:
        # Callers hold the lock.
        queue = self._queues.get(bucket)
        if queue is None:
            now = _now()
            queue = SpeechQueue(self.queue_id(bucket), "speeching-queue", now, now)
            self._queues[bucket] = queue
        return queue

    def _describe(self, bucket: str, params: Mapping[str, str]) -> dict[str, Any]:
        names = sorted(name for name in params if name not in PARAMETERS and name not in FIELDS)
        if names:
            raise ApiError(501, "NotImplemented", f"DescribeSpeechQueues has no parameter {', '.join(names)}")
        state = params.get("state") or "All"
        if state not in ("All", "Active", "Paused"):
            raise ApiError(400, "InvalidArgument", f"state must be All, Active or Paused, not {state!r}")
        page = _positive(params, "pageNumber", 1)
        size = min(_positive(params, "pageSize", 10), MAX_PAGE_SIZE)
        wanted = [queue_id for queue_id in params.get("queueIds", "").split(",") if queue_id]
        with self._lock:
            queue = self._queue(bucket)
            found = [queue.detail()] if not wanted or queue.queue_id in wanted else []
        found = [detail for detail in found if state in ("All", detail["State"])]
        answer: dict[str, Any] = {
            "TotalCount": str(len(found)),
            "PageNumber": str(page),
            "PageSize": str(size),
            "QueueList": found[(page - 1) * size : page * size],
        }
        missing = [queue_id for queue_id in wanted if queue_id != self.queue_id(bucket)]
        return answer | ({"NonExistPIDs": missing} if missing else {})

    def _update(self, bucket: str, queue_id: str, body: bytes) -> dict[str, Any]:
        request = _request(body)
        name, state = _text(request, "Name"), _text(request, "State")
        if not _NAME.fullmatch(name):
            raise ApiError(
                400, "InvalidArgument", "Request.Name is required: 1 to 128 letters, digits, CJK characters, _ - *"
            )
        if state == "Paused":
            raise ApiError(501, "NotImplemented", "the sandbox runs every job at once: its queue cannot be paused")
        if state != "Active":
            raise ApiError(400, "InvalidArgument", f"Request.State must be Active or Paused, not {state!r}")
        notify = _notify(request.get("NotifyConfig"))
        with self._lock:
            queue = self._queue(bucket)
            if queue_id != queue.queue_id:
                raise ApiError(400, "InvalidArgument", f"queue {queue_id!r} does not exist in {bucket}")
            queue.name, queue.state, queue.notify, queue.update_time = name, state, notify, _now()
            return {"Queue": queue.detail()}


def _request(body: bytes) -> dict[str, Any]:
    try:
        doc = xmltodict.parse(body, disable_entities=True)
    except (ExpatError, ValueError) as exc:
        raise ApiError(400, "MalformedXML", f"the request body is not well-formed XML ({exc})") from None
    request = doc.get("Request") if isinstance(doc, dict) else None
    if not isinstance(request, dict):
        raise ApiError(400, "MalformedXML", "the request body must be a <Request> element")
    return request


def _notify(config: Any) -> Notify:
    if not isinstance(config, dict):
        raise ApiError(400, "InvalidArgument", "Request.NotifyConfig is required")
    notify = Notify(
        state=_text(config, "State") or "Off",
        url=_text(config, "Url"),
        type=_text(config, "Type") or "Url",
        event=_text(config, "Event") or "TaskFinish",
        result_format=(_text(config, "ResultFormat") or "XML").upper(),
    )
    if notify.state not in ("On", "Off"):
        raise ApiError(400, "InvalidArgument", f"NotifyConfig.State must be On or Off, not {notify.state!r}")
    if notify.result_format not in ("XML", "JSON"):
        raise ApiError(400, "InvalidArgument", "NotifyConfig.ResultFormat must be XML or JSON")
    events = notify.event.split(",")
    if any(event not in EVENTS for event in events):
        raise ApiError(400, "InvalidArgument", f"NotifyConfig.Event must be {' and/or '.join(sorted(EVENTS))}")
    if notify.state == "On":
        for name in ("Type", "Event"):
            if not _text(config, name):
                raise ApiError(400, "InvalidArgument", f"NotifyConfig.{name} is required when State is On")
        if notify.type == "TDMQ":
            try:
                notify.mq = mq_target(config, "NotifyConfig")
            except JobRequestError as exc:
                raise ApiError(400, exc.code, exc.message) from None
            return notify
        if notify.type != "Url":
            raise ApiError(400, "InvalidArgument", f"NotifyConfig.Type must be Url or TDMQ, not {notify.type!r}")
        if urlsplit(notify.url).scheme not in ("http", "https"):
            raise ApiError(400, "InvalidArgument", "NotifyConfig.Url must be an http:// or https:// URL")
    return notify


def _text(container: dict[str, Any], name: str) -> str:
    value = container.get(name)
    return value.strip() if isinstance(value, str) else ""


def _positive(params: Mapping[str, str], name: str, default: int) -> int:
    value = params.get(name) or str(default)
    if not re.fullmatch(r"[0-9]{1,9}", value) or int(value) < 1:
        raise ApiError(400, "InvalidArgument", f"{name} must be a whole number of at least 1, not {value!r}")
    return int(value)


def _now() -> str:
    return datetime.now(_BEIJING).strftime("%Y-%m-%dT%H:%M:%S%z")
