"""Read and set the NotifyConfig of a bucket's Speeching queue, where NoiseReduction jobs run.

With the queue's notification on and pointing here, every job on the queue calls back to this
service without a ``CallBack`` of its own (a job's own ``CallBack`` still wins, and ``no`` turns
the callback off for that job). The SDK calls are ``ci_get_asr_queue`` (DescribeSpeechQueues,
``GET /asrqueue``) and ``ci_update_asr_queue`` (UpdateSpeechQueue, ``PUT /asrqueue/<QueueId>``).

From CI's documents (cloud.tencent.com 436/98454, 460/46234 and the SDK's 1045/51264 page):
the update's body is ``Name`` and ``State`` (both required) and ``NotifyConfig`` with ``State``
(``On``/``Off``), ``Url``, ``Type`` (``Url`` or ``TDMQ``), ``Event`` (``TaskFinish``,
``WorkflowFinish``, comma-separated) and ``ResultFormat`` (``XML``/``JSON``); its answer holds the
queue as ``<Queue>``; the query's answer lists queues in ``QueueList`` and unknown ids in
``NonExistPIDs``.

Not confirmed: that NoiseReduction jobs submitted through CreateMediaJobs honour the Speeching
queue's notification exactly as speech-recognition jobs do (their ``QueueType`` is
``Speeching``); whether an update that leaves out ``MqMode``/``MqName``/``MqRegion`` keeps or
clears them (a ``Url`` notification does not use them); and the ``Url`` length limit, given as 100
characters in an older version of the document and not at all in the current one, which a long
callback token can exceed. A ``TDMQ`` notification is sent with ``MqRegion``, ``MqMode`` and
``MqName`` and no ``Url``; that its message is the same document a ``Url`` notification POSTs is
not confirmed either (``cos-webhook consume`` reads both forms, and base64 of them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qcloud_cos import CosS3Client

from webhook.ci.submit import SubmitError, explained

EVENT = "TaskFinish"  # the event of a finished job; WorkflowFinish is a workflow's
_PAGE_SIZE = 10  # CI's default; the largest page it allows is not documented
_NOTIFY_ORDER = ("State", "Url", "Type", "Event", "ResultFormat")


@dataclass(frozen=True)
class QueueView:
    """One queue as CI describes it; ``notify`` holds the NotifyConfig's fields as CI named them."""

    queue_id: str
    name: str
    state: str
    notify: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"queue_id": self.queue_id, "name": self.name, "state": self.state, "notify": self.notify}

    def notify_line(self) -> str:
        """``State=On Url=… Type=Url Event=TaskFinish ResultFormat=JSON``, then any other field CI sent."""
        first = [name for name in _NOTIFY_ORDER if name in self.notify]
        names = first + [name for name in self.notify if name not in _NOTIFY_ORDER]
        return " ".join(f"{name}={self.notify[name]}" for name in names if self.notify[name]) or "none"


def list_queues(client: CosS3Client, bucket: str) -> list[QueueView]:
    """Every Speeching queue of ``bucket``, page by page."""
    queues: list[QueueView] = []
    page = 1
    while True:
        with explained(f"bucket {bucket}: listing its Speeching queues"):
            answer = client.ci_get_asr_queue(Bucket=bucket, PageNumber=page, PageSize=_PAGE_SIZE)
        listed = answer.get("QueueList") or []
        queues.extend(_view(item) for item in listed)
        total = _int(answer.get("TotalCount"), len(queues))
        if not listed or len(queues) >= total:
            return queues
        page += 1


def register(
    client: CosS3Client,
    bucket: str,
    url: str,
    result_format: str,
    queue_id: str | None = None,
    *,
    mq: Mapping[str, str] | None = None,
) -> tuple[QueueView, QueueView]:
    """Point the queue's notification at ``url``, or with ``mq`` (``MqRegion``, ``MqMode``,
    ``MqName``) at that TDMQ queue; returns the queue before and after.

    The queue is ``queue_id``, or the bucket's only Speeching queue. Its name and state are sent
    back as they were, since UpdateSpeechQueue requires both.
    """
    queues = list_queues(client, bucket)
    if queue_id:
        chosen = next((queue for queue in queues if queue.queue_id == queue_id), None)
        if chosen is None:
            known = ", ".join(queue.queue_id for queue in queues) or "none"
            raise SubmitError(f"bucket {bucket} has no Speeching queue {queue_id} (its queues: {known})")
    elif len(queues) == 1:
        chosen = queues[0]
    elif not queues:
        raise SubmitError(f"bucket {bucket} has no Speeching queue: activate Smart Audio for it first")
    else:
        ids = ", ".join(queue.queue_id for queue in queues)
        raise SubmitError(f"give --queue-id: bucket {bucket} has {len(queues)} Speeching queues ({ids})")
    target = {"Type": "TDMQ", **mq} if mq else {"Url": url, "Type": "Url"}
    request = {
        "Name": chosen.name,
        "State": chosen.state,
        "NotifyConfig": {"State": "On", **target, "Event": EVENT, "ResultFormat": result_format},
    }
    with explained(f"bucket {bucket}: updating queue {chosen.queue_id}"):
        answer = client.ci_update_asr_queue(Bucket=bucket, QueueId=chosen.queue_id, Request=request)
    updated = answer.get("Queue") or []
    if updated:
        return chosen, _view(updated[0])
    after = next((queue for queue in list_queues(client, bucket) if queue.queue_id == chosen.queue_id), chosen)
    return chosen, after


def _view(item: dict[str, Any]) -> QueueView:
    notify = item.get("NotifyConfig")
    return QueueView(
        queue_id=_str(item.get("QueueId")),
        name=_str(item.get("Name")),
        state=_str(item.get("State")),
        notify={name: _str(value) for name, value in notify.items()} if isinstance(notify, dict) else {},
    )


def _str(value: Any) -> str:
    # The SDK turns an empty element into None.
    return value if isinstance(value, str) else ""


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default
