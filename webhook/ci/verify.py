"""Verify a job against the CI API (DescribeMediaJob) before anything is fetched or forwarded.

:func:`decide` is pure: it compares what the callback claims with what CI reports.
:func:`describe_job` is the I/O edge. The bucket and region are checked against the
allowlist *before* the API is called, so callback content can never point the worker's
credentials at a bucket it was not told to trust.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


class VerifyError(Exception):
    """The CI API could not be asked (network, 5xx, unreadable answer): retry later."""


def precheck(job: Job, allow: Allowlist) -> Reject | None:
    """What can be refused from the callback alone, before any network call."""
    if job.tag not in allow.tags:
        return Reject(f"tag {job.tag} is not allowed")
    if job.input is None or not job.input.bucket:
        return Reject("callback has no Input.BucketId")
    return _location_refusal("input", job.input, allow)


def decide(claimed: Job, reported: Job | None, allow: Allowlist) -> Verdict:
    """Compare the callback's job with CI's answer for the same id."""
    refusal = precheck(claimed, allow)
    if refusal is not None:
        return refusal
    if reported is None:
        assert claimed.input is not None  # precheck guarantees it
        return Reject(f"CI does not know job {claimed.job_id} in bucket {claimed.input.bucket}")
    if reported.tag != claimed.tag:
        return Reject(f"tag differs: callback says {claimed.tag}, CI says {reported.tag}")
    if not JobState(reported.state).finished:
        return Wait(f"CI reports the job {reported.state}")
    for label, ours, theirs in (
        ("state", claimed.state, reported.state),
        ("input", _describe(claimed.input), _describe(reported.input)),
        ("output", _describe(claimed.output), _describe(reported.output)),
        ("user data", claimed.user_data, reported.user_data),
    ):
        if ours != theirs:
            return Reject(f"{label} differs: callback says {ours!r}, CI says {theirs!r}")
    if claimed.succeeded:
        if claimed.output is None or not claimed.output.key:
            return Reject("job succeeded but names no output object")
        refusal = _location_refusal("output", claimed.output, allow)
        if refusal is not None:
            return refusal
    return Accept()


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
    """DescribeMediaJob: CI's view of ``job_id`` in ``bucket``, or None if CI does not know it.

    The whole exchange has the client's timeout as its deadline; past it the answer is abandoned
    and the job is checked again later, like any other CI outage.
    """
    with cos_deadline(client, CI.address):
        try:
            answer: dict[str, Any] = client.ci_get_media_jobs(Bucket=bucket, JobIDs=job_id)
        except SDK_ERRORS as exc:
            raise VerifyError(str(cloud_error(exc, CI))) from None
    for index, item in enumerate(answer.get("JobsDetail") or []):
        try:
            job = parse_job(item, f"DescribeMediaJob JobsDetail[{index}]")
        except CallbackError as exc:
            raise VerifyError(f"unreadable DescribeMediaJob answer: {exc.message}") from None
        if job.job_id == job_id:
            return job
    return None


def _location_refusal(label: str, where: ObjectLocation, allow: Allowlist) -> Reject | None:
    if where.bucket not in allow.buckets:
        return Reject(f"{label} bucket {where.bucket} is not in WEBHOOK_ALLOWED_BUCKETS")
    if where.region not in allow.regions:
        return Reject(f"{label} region {where.region} is not an allowed region")
    return None


def _describe(where: ObjectLocation | None) -> str:
    return "" if where is None else f"{where.bucket}/{where.key} in {where.region}"
