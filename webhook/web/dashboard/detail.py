"""The job page's content, assembled from the ledger's views: callbacks, timeline, event documents."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from webhook.ci.verify import OutputUnknown, written_outputs
from webhook.ledger import AttemptView, JobView, RawCallback, TaskView, VersionView
from webhook.models import FetchedFile, JobFile, JobStatus, Outcome, TaskKind, TaskStatus
from webhook.sinks.events import build_event, event_document

# The document's file fields that describe the fetched object, known only when a worker delivers.
_FETCHED_FIELDS = ("size", "crc64", "content_type", "etag")


@dataclass(frozen=True)
class CallbackEntry:
    """A stored request that named the job, with what verification made of its version (if it had one)."""

    request: RawCallback
    version: VersionView | None
    headers: str  # pretty JSON
    body: str  # decoded; the template escapes it

    @property
    def ignored(self) -> bool:
        return self.version is None


@dataclass(frozen=True)
class Lane:
    """The attempts at one step of the job: verification, fetching, or one sink's deliveries."""

    title: str
    step: str
    sink: str
    attempts: tuple[AttemptView, ...]
    task: TaskView | None

    @property
    def badge(self) -> str:
        """The task's status, or ``rejected`` for a verification that ended refusing the job: its
        task is done, but a green "done" beside a rejection says the opposite of what happened."""
        if self.task is None:
            return ""
        tried = [a for a in self.attempts if a.outcome != Outcome.REPLAYED]
        if (
            self.step == "verify"
            and self.task.status == TaskStatus.DONE
            and tried
            and tried[-1].outcome == Outcome.REJECTED
        ):
            return Outcome.REJECTED
        return self.task.status


@dataclass(frozen=True)
class EventDocument:
    sink: str
    text: str  # pretty JSON


def callback_entries(view: JobView, requests: list[RawCallback]) -> list[CallbackEntry]:
    by_callback = {version.callback_id: version for version in view.versions}
    return [
        CallbackEntry(request, by_callback.get(request.id), _pretty_headers(request.headers), _text(request.body))
        for request in requests
    ]


def lanes(view: JobView) -> list[Lane]:
    """Verification, then fetching, then each sink: every lane with its attempts, oldest first."""
    verify = next((t for t in view.tasks if t.kind == TaskKind.VERIFY), None)
    found = [Lane("verification", "verify", "", _of(view, "verify", None), verify)]
    fetches = _of(view, "fetch", None)
    if fetches:
        found.append(Lane("fetch", "fetch", "", fetches, None))
    sinks = [t.sink for t in view.tasks if t.kind == TaskKind.DELIVER and t.sink]
    sinks += sorted({a.sink for a in view.attempts if a.step == "deliver" and a.sink} - set(sinks))
    for sink in sinks:
        task = next((t for t in view.tasks if t.kind == TaskKind.DELIVER and t.sink == sink), None)
        found.append(Lane(f"delivery to {sink}", "deliver", sink, _of(view, "deliver", sink), task))
    return found


def verified(view: JobView) -> bool:
    """CI confirmed the job: it has deliveries, or went on to be delivered (perhaps to no sink)."""
    has_deliveries = any(t.kind == TaskKind.DELIVER for t in view.tasks)
    return has_deliveries or view.status in (JobStatus.VERIFIED, JobStatus.DELIVERED, JobStatus.FAILED)


def event_documents(view: JobView) -> list[EventDocument]:
    """The document each sink of the job receives, built as the worker builds it (webhook.sinks.events).

    The fetched object's size, CRC64, content type and etag are filled in at delivery: ``null`` here.
    """
    job = view.job
    if job is None or not verified(view):
        return []
    placeholders: tuple[JobFile, ...] = ()
    if job.succeeded:
        try:
            written = written_outputs(job)
        except OutputUnknown:
            written = ()  # no event can be built: the job's deliveries say why
        unknown = FetchedFile(path=None, size=0, crc64="", content_type="", etag="")
        placeholders = tuple(JobFile(where, unknown, n, len(written)) for n, where in enumerate(written, start=1))
    documents = []
    for sink in (t.sink for t in view.tasks if t.kind == TaskKind.DELIVER and t.sink):
        try:
            document = event_document(build_event(job, sink, placeholders))
        except ValueError:
            continue  # a job that cannot make an event (no output): its delivery says why
        for file in [document["file"], *document["files"]]:
            if isinstance(file, dict):
                file.update(dict.fromkeys(_FETCHED_FIELDS))
        documents.append(EventDocument(sink, json.dumps(document, indent=2, ensure_ascii=False)))
    return documents


def _of(view: JobView, step: str, sink: str | None) -> tuple[AttemptView, ...]:
    return tuple(a for a in view.attempts if a.step == step and a.sink == sink)


def _pretty_headers(text: str) -> str:
    try:
        parsed: Any = json.loads(text)
    except ValueError:
        return text
    return json.dumps(parsed, indent=2, ensure_ascii=False, sort_keys=True)


def _text(body: bytes) -> str:
    return body.decode("utf-8", "replace")
