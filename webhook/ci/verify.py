"""Verify a job against the CI API (DescribeMediaJob) before anything is fetched or forwarded.

:func:`decide` is pure: it compares what the callback claims with what CI reports.
:func:`describe_job` is the I/O edge. The bucket and region are checked against the
allowlist *before* the API is called, so callback content can never point the worker's
credentials at a bucket it was not told to trust.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields, replace
from typing import Any

from qcloud_cos import CosS3Client

from webhook.ci.client import CI, SDK_ERRORS, cloud_error, cos_deadline
from webhook.intake.callback import CallbackError, parse_job
from webhook.models import Job, JobState, ObjectLocation


@dataclass(frozen=True)
class Allowlist:
    buckets: frozenset[str]
    regions: frozenset[str]
    tags: frozenset[str]


@dataclass(frozen=True)
class Accept:
    """CI confirms the callback."""


@dataclass(frozen=True)
class Reject:
    """The callback is refused for good; ``reason`` is recorded on the job."""

    reason: str


@dataclass(frozen=True)
class Wait:
    """CI does not report the job finished yet: check again later."""

    reason: str


Verdict = Accept | Reject | Wait


Place = tuple[str, str]  # (region, bucket): where DescribeMediaJob is asked


class FoundAt:
    """Where each recently verified job was found, so that its next verification asks there first.

    Shared by a worker's threads; bounded, the oldest forgotten first.
    """

    def __init__(self, limit: int = 10_000) -> None:
        self._places: OrderedDict[str, Place] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def get(self, job_id: str) -> Place | None:
        with self._lock:
            return self._places.get(job_id)

    def remember(self, job_id: str, place: Place) -> None:
        with self._lock:
            self._places[job_id] = place
            self._places.move_to_end(job_id)
            while len(self._places) > self._limit:
                self._places.popitem(last=False)


class OutputUnknown(Exception):
    """CI reports a success but no object this service can fetch: retrying cannot help until it does."""


class VerifyError(Exception):
    """The CI API could not be asked (network, 5xx, unreadable answer): retry later."""


def precheck(job: Job, allow: Allowlist) -> Reject | None:
    """What can be refused from the callback alone, before any network call.

    A location the callback leaves out or empty is not stated: CI is asked where the job is
    (:func:`where_to_ask`). What it does state must be allowlisted, the output included, so
    callback content can never point the worker's credentials elsewhere.
    """
    if job.tag not in allow.tags:
        return Reject(f"tag {job.tag} is not allowed")
    stated = [("input", job.input), ("output", job.output)]
    stated += [("output", ObjectLocation(f.bucket, f.region, "")) for f in job.output_files]
    for label, where in stated:
        if where is not None and (refusal := _location_refusal(label, where, allow)):
            return refusal
    return None


def where_to_ask(job: Job, allow: Allowlist) -> tuple[Place, ...]:
    """The (region, bucket) pairs whose DescribeMediaJob may know ``job``, most likely first.

    A stated input bucket and region are the only place; what the callback leaves out is
    searched among the allowlist: every allowed bucket (a stated output bucket first: jobs
    usually write where they read) in the stated region, else in every allowed region.
    """
    bucket = job.input.bucket if job.input else ""
    region = job.input.region if job.input else ""
    hinted = [job.output.bucket] if job.output and job.output.bucket else []
    buckets = [bucket] if bucket else list(dict.fromkeys([*hinted, *sorted(allow.buckets)]))
    regions = [region] if region else sorted(allow.regions)
    return tuple((r, b) for b in buckets if b in allow.buckets for r in regions if r in allow.regions)


def decide(claimed: Job, reported: Job | None, allow: Allowlist, asked: Sequence[Place] = ()) -> Verdict:
    """Compare the callback's job with CI's answer for the same id (None: no bucket in ``asked`` knew it).

    Only what the callback states is compared: an empty field is not a claim. The output that
    counts is CI's, which must be allowlisted too.
    """
    refusal = precheck(claimed, allow)
    if refusal is not None:
        return refusal
    if reported is None:
        return Reject(_unknown(claimed, asked or where_to_ask(claimed, allow)))
    if reported.tag != claimed.tag:
        return Reject(f"tag differs: callback says {claimed.tag}, CI says {reported.tag}")
    if not JobState(reported.state).finished:
        return Wait(f"CI reports the job {reported.state}")
    for label, ours, theirs in (
        ("state", claimed.state, reported.state),
        ("input", claimed.input, reported.input),
        ("output", claimed.output, reported.output),
    ):
        if isinstance(ours, ObjectLocation | None) and isinstance(theirs, ObjectLocation | None):
            if not _agrees(ours, theirs):
                return Reject(f"{label} differs: callback says {_describe(ours)!r}, CI says {_describe(theirs)!r}")
        elif ours != theirs:
            return Reject(f"{label} differs: callback says {ours!r}, CI says {theirs!r}")
    if claimed.user_data and claimed.user_data != reported.user_data:
        return Reject(f"user data differs: callback says {claimed.user_data!r}, CI says {reported.user_data!r}")
    job = confirmed(claimed, reported)
    if job.succeeded:
        if job.output is None or not job.output.key:
            return Reject("job succeeded but names no output object")
        refusal = precheck(job, allow)
        if refusal is not None:
            return refusal
    return Accept()


def confirmed(claimed: Job, reported: Job) -> Job:
    """The job as delivered: CI's answer, with what CI left empty taken from the callback."""
    filled = {
        field.name: getattr(claimed, field.name)
        for field in fields(Job)
        if getattr(reported, field.name) in ("", None, ()) and getattr(claimed, field.name) not in ("", None, ())
    }
    return replace(reported, **filled)


def overall(verdicts: Sequence[Verdict]) -> Verdict:
    """The job's verdict from those of its versions (one per distinct callback).

    Accepted if CI confirms any version, so a forgery that arrived first cannot shadow the
    genuine callback; else wait while CI has not finished; else rejected, with every reason.
    """
    if any(isinstance(verdict, Accept) for verdict in verdicts):
        return Accept()
    for verdict in verdicts:
        if isinstance(verdict, Wait):
            return verdict
    reasons = dict.fromkeys(verdict.reason for verdict in verdicts if isinstance(verdict, Reject))
    return Reject("; ".join(reasons) or "no version of the job to verify")


def describe_job(client: CosS3Client, bucket: str, job_id: str) -> Job | None:
    """DescribeMediaJob: CI's view of ``job_id`` in ``bucket``, or None if CI does not know it there
    (or, answering NoSuchBucket, does not have the bucket in the client's region).

    The whole exchange has the client's timeout as its deadline; past it the answer is abandoned
    and the job is checked again later, like any other CI outage.
    """
    with cos_deadline(client, CI.address):
        try:
            answer: dict[str, Any] = client.ci_get_media_jobs(Bucket=bucket, JobIDs=job_id)
        except SDK_ERRORS as exc:
            error = cloud_error(exc, CI)
            if error.status == 404 and error.code == "NoSuchBucket":
                return None  # the bucket is not in this region: the job is not here
            raise VerifyError(str(error)) from None
    for index, item in enumerate(answer.get("JobsDetail") or []):
        try:
            job = parse_job(item, f"DescribeMediaJob JobsDetail[{index}]")
        except CallbackError as exc:
            raise VerifyError(f"unreadable DescribeMediaJob answer: {exc.message}") from None
        if job.job_id == job_id:
            return job
    return None


def _location_refusal(label: str, where: ObjectLocation, allow: Allowlist) -> Reject | None:
    if where.bucket and where.bucket not in allow.buckets:
        return Reject(f"{label} bucket {where.bucket} is not in WEBHOOK_ALLOWED_BUCKETS")
    if where.region and where.region not in allow.regions:
        return Reject(f"{label} region {where.region} is not an allowed region")
    return None


def _agrees(ours: ObjectLocation | None, theirs: ObjectLocation | None) -> bool:
    """Every part of ``ours`` that is stated (not empty) is the same in ``theirs``."""
    if ours is None:
        return True
    if theirs is None:
        return not (ours.bucket or ours.region or ours.key)
    return all(not mine or mine == its for mine, its in zip(astuple(ours), astuple(theirs), strict=True))


def _unknown(job: Job, asked: Sequence[Place]) -> str:
    if len(asked) == 1:
        return f"CI does not know job {job.job_id} in bucket {asked[0][1]}"
    if not asked:
        return f"CI was not asked about job {job.job_id}: no allowlisted bucket and region to look in"
    places = ", ".join(f"{bucket} in {region}" for region, bucket in asked)
    return f"no allowlisted bucket knows job {job.job_id} (asked {places})"


def _describe(where: ObjectLocation | None) -> str:
    return "" if where is None else f"{where.bucket}/{where.key} in {where.region}"


_PLACEHOLDER = re.compile(r"\$\{[^}]*\}")


def written_output(job: Job) -> ObjectLocation:
    """The object CI wrote for a successful ``job``, as confirmed by CI.

    ``Output.Object`` is the name as submitted and may be a template (``${ext}``,
    ``${InputName}``…); the name CI wrote is in ``MediaResult/OutputFile``, whose empty bucket
    or region means the output's. A key with an unresolved placeholder is never fetched: without
    a name from CI, :class:`OutputUnknown` says why.
    """
    base = job.output or ObjectLocation("", "", "")
    names = [(file, name) for file in job.output_files for name in file.object_names]
    if len(names) > 1:
        listed = ", ".join(name for _, name in names[:5]) + (", …" if len(names) > 5 else "")
        raise OutputUnknown(f"CI wrote {len(names)} files ({listed}); one file per job is delivered")
    if names:
        file, name = names[0]
        return ObjectLocation(file.bucket or base.bucket, file.region or base.region, name)
    if prefixes := [file.object_prefix for file in job.output_files if file.object_prefix]:
        raise OutputUnknown(f"CI wrote files under {prefixes[0]!r} without naming them; one file per job is delivered")
    if _PLACEHOLDER.search(base.key):
        raise OutputUnknown(f"output {base.key!r} is a template and CI names no file it wrote")
    return base


def reported_md5(job: Job, key: str) -> str:
    """The MD5 CI reported for the object ``key`` it wrote for ``job``; empty if it gave none."""
    return next((d.md5 for file in job.output_files for d in file.digests if d.object_name == key), "")
