"""Events as the worker hands them to notification sinks: no bytes, a location instead."""

from __future__ import annotations

from webhook.models import Event, FetchedFile, FileLocation, Job, ObjectLocation
from webhook.sinks.events import build_event

OUTPUT = ObjectLocation("audio-1250000000", "ap-guangzhou", "out/a.wav")
PRESIGNED = "https://audio-1250000000.cos.ap-guangzhou.myqcloud.com/out/a.wav?sign=abc"


def notified(location: FileLocation, job_id: str = "job-1", sink: str = "events") -> Event:
    """A succeeded job's event, its file described (not downloaded) and found at ``location``."""
    job = Job(job_id=job_id, tag="NoiseReduction", state="Success", output=OUTPUT, user_data="order-42")
    fetched = FetchedFile(path=None, size=1024, crc64="6230416154291387364", content_type="audio/wav", etag='"e1"')
    return build_event(job, sink, fetched, location)


def failed(sink: str, job_id: str = "job-2") -> Event:
    job = Job(job_id=job_id, tag="NoiseReduction", state="Failed", code="InvalidInput", message="bad audio")
    return build_event(job, sink, None)
