"""Typed records that travel between the pipeline steps."""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, fields
from typing import Any


class JobState(enum.StrEnum):
    """A job's state as CI reports it."""

    SUBMITTED = "Submitted"
    RUNNING = "Running"
    SUCCESS = "Success"
    FAILED = "Failed"
    PAUSE = "Pause"
    CANCEL = "Cancel"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCESS, JobState.FAILED, JobState.CANCEL)


class JobStatus(enum.StrEnum):
    """Where a job stands in this service."""

    RECEIVED = "received"  # recorded, waiting for verification
    VERIFIED = "verified"  # CI confirmed it, deliveries pending
    DELIVERED = "delivered"  # every sink has it
    FAILED = "failed"  # CI reports the job did not succeed (Failed, Cancel): every sink has its failure event
    REJECTED = "rejected"  # verification refused it: never fetched nor forwarded
    DEAD = "dead"  # a step ran out of retries
    IGNORED = "ignored"  # another event or tag: recorded only


class VersionStatus(enum.StrEnum):
    """What verification made of one callback's version of a job."""

    PENDING = "pending"  # not verified yet
    ACCEPTED = "accepted"  # CI agrees: the job goes on with this version
    REJECTED = "rejected"  # CI disagrees (or another version was accepted)
    CAPPED = "capped"  # kept, never verified: the job already had the most versions one job may have


class TaskKind(enum.StrEnum):
    VERIFY = "verify"
    DELIVER = "deliver"


class TaskStatus(enum.StrEnum):
    PENDING = "pending"
    DONE = "done"
    DEAD = "dead"


class Step(enum.StrEnum):
    """What an attempt tried: fetching is a step of its own, shared by the job's deliveries."""

    VERIFY = "verify"
    FETCH = "fetch"
    DELIVER = "deliver"


class Outcome(enum.StrEnum):
    """How an attempt ended."""

    OK = "ok"
    REJECTED = "rejected"  # verification refused the job
    RETRY = "retry"  # failed; the task is due again later
    DEAD = "dead"  # failed, and retrying cannot help or the budget is spent
    ABANDONED = "abandoned"  # cut off by a shutdown; due again at once
    # Not an attempt: a mark in the timeline where someone asked for the step again (replay);
    # what follows it in the step's lane is the replay.
    REPLAYED = "replayed"


@dataclass(frozen=True)
class ObjectLocation:
    """Where an object lives in COS."""

    bucket: str
    region: str
    key: str


@dataclass(frozen=True)
class CosHeader:
    key: str
    value: str


@dataclass(frozen=True)
class Workflow:
    name: str = ""
    run_id: str = ""
    workflow_id: str = ""
    workflow_name: str = ""


@dataclass(frozen=True)
class FileDigest:
    """CI's MD5 of one output object (``MediaResult/OutputFile/Md5Info``)."""

    object_name: str
    md5: str


@dataclass(frozen=True)
class OutputFile:
    """What CI reports it wrote (``Operation/MediaResult/OutputFile``): the resolved object names.

    ``Output.Object`` is the name as submitted and may be a template (``${ext}``…); these are the
    objects that exist. ``object_prefix`` is set instead of names when CI wrote a set of objects
    under a prefix (segments, frames).
    """

    bucket: str = ""
    region: str = ""
    object_names: tuple[str, ...] = ()
    object_prefix: str = ""
    digests: tuple[FileDigest, ...] = ()


@dataclass(frozen=True)
class MediaSummary:
    """CI's probe of the output (``Operation/MediaInfo``): enough for receivers not to probe the file."""

    format_name: str = ""
    duration: str = ""  # seconds, as CI writes it ("13.654000")
    size: str = ""  # bytes
    bitrate: str = ""  # kbit/s
    audio_codec: str = ""
    sample_rate: str = ""
    channels: str = ""


@dataclass(frozen=True)
class Job:
    """One element of ``JobsDetail``, normalized from XML or JSON."""

    job_id: str
    tag: str
    state: str
    code: str = ""
    message: str = ""
    creation_time: str = ""
    start_time: str = ""
    end_time: str = ""
    queue_id: str = ""
    queue_type: str = ""
    input: ObjectLocation | None = None
    output: ObjectLocation | None = None
    user_data: str = ""
    job_level: str = ""
    template_id: str = ""
    template_name: str = ""
    format: str = ""
    sample_rate: str = ""
    cos_headers: tuple[CosHeader, ...] = ()
    workflow: Workflow | None = None
    progress: str = ""
    sub_tag: str = ""
    output_files: tuple[OutputFile, ...] = ()
    media_info: MediaSummary | None = None

    @property
    def succeeded(self) -> bool:
        return self.state == JobState.SUCCESS

    @property
    def failure(self) -> str:
        """CI's account of why the job did not succeed ("" if it did): its state, code and message."""
        if self.succeeded:
            return ""
        said = ": ".join(part for part in (self.code, self.message) if part)
        return f"CI reports {self.state}" + (f" ({said})" if said else "")


@dataclass(frozen=True)
class Callback:
    """A parsed callback body: the event and the jobs it reports."""

    event_name: str
    jobs: tuple[Job, ...]
    body_format: str  # "json" or "xml"


@dataclass(frozen=True)
class Triaged:
    """One job of a callback and what becomes of it: ``forward``, or recorded only for ``reason``."""

    job: Job
    forward: bool
    reason: str = ""


@dataclass(frozen=True)
class FetchedFile:
    """A job's output object: downloaded to ``path`` and checked, or only described (``path`` None).

    Only described when no due sink needs the bytes (a server-side copy, a notification).
    """

    path: str | None
    size: int
    crc64: str
    content_type: str
    etag: str = ""
    md5: str = ""  # CI's MD5 of the object, checked against the bytes fetched; empty if CI gave none


@dataclass(frozen=True)
class FileLocation:
    """Where a sink keeps (or will keep) a job's file, for notifications that point at it."""

    kind: str  # "cos", "s3", "filesystem" or "source" (CI's output object itself)
    bucket: str = ""
    key: str = ""
    region: str = ""
    path: str = ""
    url: str = ""  # a presigned URL, when one was asked for


@dataclass(frozen=True)
class JobFile:
    """One of the objects CI wrote for a succeeded job, as a sink receives it.

    ``number`` is its place among the job's ``count`` files, from 1 in the order CI names them;
    together with ``source``'s key they decide the name a storage sink gives it. ``location`` is
    set for notification sinks only: where the message says the file is.
    """

    source: ObjectLocation  # the object CI wrote
    fetched: FetchedFile
    number: int = 1
    count: int = 1
    location: FileLocation | None = None


@dataclass(frozen=True)
class Event:
    """What a sink receives: the verified job as metadata, plus its files (in CI's order) on success."""

    event_id: str
    type: str  # "job.succeeded" or "job.failed"
    job: Job
    files: tuple[JobFile, ...] = ()

    @property
    def file(self) -> FetchedFile | None:
        """The first file as fetched: the one the document's ``file`` describes, as before jobs had several."""
        return self.files[0].fetched if self.files else None


def job_to_dict(job: Job) -> dict[str, Any]:
    """The job as plain JSON-ready data (ledger rows and sink metadata)."""
    return asdict(job)


def job_from_dict(data: Any) -> Job:
    """Inverse of :func:`job_to_dict`, tolerant of other versions' rows.

    Unknown keys are ignored and missing ones take their defaults; :class:`ValueError` says
    why if what remains is still not a job.
    """
    try:
        values = _known(Job, data)
        for key in ("input", "output"):
            if values.get(key) is not None:
                values[key] = ObjectLocation(**_known(ObjectLocation, values[key]))
        values["cos_headers"] = tuple(CosHeader(**_known(CosHeader, h)) for h in values.get("cos_headers") or ())
        if values.get("workflow") is not None:
            values["workflow"] = Workflow(**_known(Workflow, values["workflow"]))
        values["output_files"] = tuple(_output_file(f) for f in values.get("output_files") or ())
        if values.get("media_info") is not None:
            values["media_info"] = MediaSummary(**_known(MediaSummary, values["media_info"]))
        return Job(**values)
    except (TypeError, AttributeError) as exc:
        raise ValueError(f"not a job: {exc}") from None


def job_to_json(job: Job) -> str:
    """The job as the ledger stores it (a row's and a version's ``detail``)."""
    return json.dumps(job_to_dict(job))


def job_from_json(text: str) -> Job:
    """A job stored as JSON; :class:`ValueError` if it cannot be read."""
    return job_from_dict(json.loads(text))


def _output_file(data: Any) -> OutputFile:
    values = _known(OutputFile, data)
    values["object_names"] = tuple(values.get("object_names") or ())
    values["digests"] = tuple(FileDigest(**_known(FileDigest, d)) for d in values.get("digests") or ())
    return OutputFile(**values)


def _known(cls: type, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} is {type(data).__name__}, not an object")
    names = {field.name for field in fields(cls)}
    return {key: value for key, value in data.items() if key in names}
