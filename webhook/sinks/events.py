r"""The event every sink receives: one versioned metadata document per job and sink.

Example: the job ``je8f…303c`` succeeded and its output ``out/a.wav`` was fetched, so the
``filesystem`` sink stores it as ``je8f…303c.wav`` beside this document (the http sink gets the
same with its own ``event_id`` and without ``stored_as``)::

    {
      "schema": "cos-webhook.event/v1",
      "event_id": "evt_52952a54c51c4394db6115ab958480d2",
      "type": "job.succeeded",
      "job": {
        "job_id": "je8f65004eb8511eaaed4f377124a303c", "tag": "NoiseReduction", "state": "Success",
        "code": "Success", "message": "Success",
        "creation_time": "2024-05-01T10:00:00+0800", "start_time": "2024-05-01T10:00:01+0800",
        "end_time": "2024-05-01T10:00:09+0800",
        "queue_id": "p2242ab62c7c94486915508540933a2c6", "queue_type": "Speeching",
        "input": {"bucket": "audio-1250000000", "region": "ap-guangzhou", "key": "in/a.wav"},
        "output": {"bucket": "audio-1250000000", "region": "ap-guangzhou", "key": "out/a.wav"},
        "user_data": "order-42", "job_level": "0", "template_id": "", "template_name": "",
        "format": "wav", "sample_rate": "16000",
        "cos_headers": [{"key": "x-cos-meta-id", "value": "42"}], "workflow": null,
        "progress": "100", "sub_tag": "",
        "output_files": [{
          "bucket": "audio-1250000000", "region": "ap-guangzhou", "object_names": ["out/a.wav"],
          "object_prefix": "", "digests": [{"object_name": "out/a.wav", "md5": "9e107d9d372bb6826bd81d3542a419d6"}]
        }],
        "media_info": {
          "format_name": "wav", "duration": "0.032000", "size": "1024", "bitrate": "256.000000",
          "audio_codec": "pcm_s16le", "sample_rate": "16000", "channels": "1"
        }
      },
      "file": {
        "name": "a.wav", "size": 1024, "crc64": "6230416154291387364",
        "content_type": "audio/wav", "etag": "\"e1\"", "md5": "9e107d9d372bb6826bd81d3542a419d6"
      },
      "files": [{
        "name": "a.wav", "size": 1024, "crc64": "6230416154291387364",
        "content_type": "audio/wav", "etag": "\"e1\"", "md5": "9e107d9d372bb6826bd81d3542a419d6",
        "stored_as": "je8f65004eb8511eaaed4f377124a303c.wav"
      }]
    }

``files`` lists every object CI wrote for the job, in the order CI names them (``MediaResult``):
one for most jobs, several when ``Output.Object`` held ``${Number}``. ``file`` is the first of
them, as v1 documents had it before jobs could have several; ``stored_as`` is in the storage
sinks' (filesystem, cos, s3) own documents only: the file name or key that sink gave the file.
A failed job gives ``"type": "job.failed"``, ``"file": null`` and ``"files": []``.
Notification sinks (redis, amqp, http in json mode) carry no bytes; their ``file`` and each of
their ``files`` also has a ``location``: where a storage sink put that file, or CI's output
object itself, e.g. ``{"kind": "cos", "bucket": "archive-1250000000", "key":
"denoised/je8f….wav", "region": "ap-guangzhou", "url": "<presigned, if configured>"}``.
Receivers should dispatch on ``schema``: a later version may add fields, and an incompatible
change gets a new version.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from webhook.models import Event, FetchedFile, FileLocation, Job, JobFile, JobState, ObjectLocation, job_to_dict

SCHEMA = "cos-webhook.event/v1"
SUCCEEDED = "job.succeeded"
FAILED = "job.failed"


def event_id(job_id: str, sink: str) -> str:
    """The idempotency key of ``job_id``'s delivery to ``sink``: the same on every attempt and replay."""
    digest = hashlib.sha256(job_id.encode() + b"\0" + sink.encode()).hexdigest()
    return "evt_" + digest[:32]


def build_event(
    job: Job, sink: str, files: Sequence[JobFile] | FetchedFile | None, location: FileLocation | None = None
) -> Event:
    """The event for ``sink``: ``job.succeeded`` with the job's files, or ``job.failed`` without any.

    ``files`` are every object CI wrote, in its order; a :class:`FetchedFile` alone stands for a
    job's one file, ``job.output`` (found at ``location``, for a notification).
    A canceled job is also ``job.failed`` (``job.state`` tells them apart): it finished without output.
    Raises :class:`ValueError` for any other combination (an unfinished job, a success without
    its output, a failure with a file): those are bugs upstream, not deliveries.
    """
    if isinstance(files, FetchedFile):  # a job without an output to be its source is refused below
        files = (JobFile(job.output or ObjectLocation("", "", ""), files, location=location),)
    files = tuple(files or ())
    if job.state == JobState.SUCCESS and files and job.output is not None:
        return Event(event_id=event_id(job.job_id, sink), type=SUCCEEDED, job=job, files=files)
    if job.state in (JobState.FAILED, JobState.CANCEL) and not files:
        return Event(event_id=event_id(job.job_id, sink), type=FAILED, job=job)
    raise ValueError(
        f"job {job.job_id}: no event for state {job.state!r} "
        f"{'with' if files else 'without'} a file and {'with' if job.output else 'without'} an output"
    )


def event_document(event: Event, stored_as: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON document for ``event`` (see the module docstring); equal to its own JSON round trip.

    ``stored_as`` are the names a storage sink gave the files, in their order, for its own document.
    """
    files = [_file(file) for file in event.files]
    if stored_as:
        for entry, name in zip(files, stored_as, strict=True):
            entry["stored_as"] = name
    return {
        "schema": SCHEMA,
        "event_id": event.event_id,
        "type": event.type,
        "job": _as_lists(job_to_dict(event.job)),
        # v1's one file, as before jobs had several: the first, as ``files`` lists it but for ``stored_as``.
        "file": _file(event.files[0]) if event.files else None,
        "files": files,
    }


def _file(file: JobFile) -> dict[str, Any]:
    fetched = file.fetched
    entry: dict[str, Any] = {
        "name": posixpath.basename(file.source.key),
        "size": fetched.size,
        "crc64": fetched.crc64,
        "content_type": fetched.content_type,
        "etag": fetched.etag,
        "md5": fetched.md5,
    }
    if file.location is not None:
        entry["location"] = {k: v for k, v in asdict(file.location).items() if v}
    return entry


def _as_lists(value: Any) -> Any:
    """asdict keeps tuples; lists make the document compare equal to what a receiver parses."""
    if isinstance(value, tuple | list):
        return [_as_lists(item) for item in value]
    if isinstance(value, dict):
        return {key: _as_lists(item) for key, item in value.items()}
    return value


def document_bytes(event: Event, stored_as: Sequence[str] = ()) -> bytes:
    """The metadata document as the ``<job_id>.event.json`` file that storage sinks write, naming
    what each file was ``stored_as``."""
    return json.dumps(event_document(event, stored_as), indent=2, ensure_ascii=False).encode() + b"\n"
