"""Submit a NoiseReduction job whose callback comes to this service, and follow it in the ledger.

What ``cos-webhook submit`` does, without the command line: pick the bucket, build the callback
URL, upload a local file, submit with the SDK (:func:`submit_noise_reduction`, the same
call the tests and the demo make) and watch the job's status until it ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qcloud_cos import CosS3Client

from webhook.ci.client import CI, COS, SDK_ERRORS, Api, client_for, cloud_error
from webhook.config import Settings
from webhook.errors import ConfigError
from webhook.ledger import UnknownJob
from webhook.ledger.views import Views
from webhook.models import JobStatus, ObjectLocation, TaskStatus

CI_REGIONS = ("sh", "bj", "gz", "cd", "hk")  # what CI takes as MqRegion
# Statuses a job does not leave on its own (replay can bring a rejected or dead one back).
FINAL = frozenset({JobStatus.DELIVERED, JobStatus.FAILED, JobStatus.DEAD, JobStatus.REJECTED, JobStatus.IGNORED})


def submit_noise_reduction(
    client: CosS3Client,
    input_key: str,
    output: ObjectLocation,
    callback_url: str,
    callback_format: str | None = "JSON",
    user_data: str = "",
    *,
    template_id: str = "",
    callback_mq: Mapping[str, str] | None = None,
) -> str:
    """Submit a job that denoises ``input_key`` (in ``output``'s bucket); returns its JobId.

    The job writes a 16 kHz WAV, or what the NoiseReduction template ``template_id`` says. An empty
    ``callback_url`` leaves ``CallBack`` out, so the queue's NotifyConfig decides where CI calls
    back; ``callback_format`` None leaves ``CallBackFormat`` out (then the queue's ResultFormat, or
    XML, applies). ``callback_mq`` (``MqRegion``, ``MqMode``, ``MqName``) makes CI put the callback
    on that TDMQ queue instead (``CallBackType: TDMQ``).
    """
    operation: dict[str, object] = (
        {"TemplateId": template_id} if template_id else {"NoiseReduction": {"Format": "wav", "SampleRate": "16000"}}
    )
    operation["Output"] = {"Region": output.region, "Bucket": output.bucket, "Object": output.key}
    if user_data:
        operation["UserData"] = user_data
    jobs: dict[str, object] = {"Tag": "NoiseReduction", "Input": {"Object": input_key}, "Operation": operation}
    if callback_url:
        jobs["CallBack"] = callback_url
    if callback_mq:
        jobs["CallBackType"] = "TDMQ"
        jobs["CallBackMqConfig"] = dict(callback_mq)
    if callback_format:
        jobs["CallBackFormat"] = callback_format.upper()
    answer = client.ci_create_media_jobs(Bucket=output.bucket, Jobs=jobs)
    job_id: str = answer["JobsDetail"][0]["JobId"]
    return job_id


class SubmitError(Exception):
    """What stopped a submission or a queue change, in words for the operator."""


@contextmanager
def explained(what: str, api: Api = CI) -> Iterator[None]:
    """Turn the SDK's errors inside the block into a :class:`SubmitError` that starts with ``what``."""
    try:
        yield
    except SDK_ERRORS as exc:
        raise SubmitError(f"{what}: {cloud_error(exc, api)}") from None


def mq_config(region: str, queue: str) -> dict[str, str]:
    """CI's ``CallBackMqConfig`` (also a queue NotifyConfig's Mq fields) for CMQ queue ``queue`` in ``region``."""
    if region not in CI_REGIONS:
        raise ConfigError(
            f"WEBHOOK_TDMQ_REGION must be one of {', '.join(CI_REGIONS)} for CI's callbacks, not {region!r}"
        )
    if not queue:
        raise ConfigError("WEBHOOK_TDMQ_QUEUE is not set (the CMQ queue CI sends callbacks to)")
    return {"MqRegion": region, "MqMode": "Queue", "MqName": queue}


def callback_url(settings: Settings) -> str:
    """Where CI should POST callbacks: ``WEBHOOK_PUBLIC_URL`` + ``/callback/`` + the first token."""
    if not settings.public_url:
        raise SubmitError(
            "WEBHOOK_PUBLIC_URL is not set: it is this service's public base URL (https://hooks.example.com), "
            "which CI calls back"
        )
    if not settings.callback_tokens:
        raise SubmitError("WEBHOOK_CALLBACK_TOKEN is not set (16 to 256 URL-safe characters)")
    return f"{settings.public_url.rstrip('/')}/callback/{settings.callback_tokens[0]}"


def callback_queue(settings: Settings, queue: str | None = None) -> dict[str, str]:
    """CI's ``CallBackMqConfig`` for ``queue``, or the first of ``WEBHOOK_TDMQ_QUEUE``, in ``WEBHOOK_TDMQ_REGION``."""
    if not settings.tdmq_region:
        raise SubmitError(
            "WEBHOOK_TDMQ_REGION is not set: the region of the TDMQ queue CI sends callbacks to (sh, bj …)"
        )
    try:
        return mq_config(settings.tdmq_region, queue or next(iter(settings.tdmq_queues), ""))
    except ConfigError as exc:
        raise SubmitError(str(exc)) from None


def choose_bucket(settings: Settings, bucket: str | None) -> str:
    """``bucket``, or else the only bucket of ``WEBHOOK_ALLOWED_BUCKETS``."""
    allowed = sorted(settings.allowed_buckets)
    if bucket:
        if allowed and bucket not in allowed:
            # The worker rejects jobs outside the allowlist: submitting one would only waste a job.
            raise SubmitError(f"bucket {bucket} is not in WEBHOOK_ALLOWED_BUCKETS ({', '.join(allowed)})")
        return bucket
    if len(allowed) == 1:
        return allowed[0]
    if not allowed:
        raise SubmitError("give --bucket, or set WEBHOOK_ALLOWED_BUCKETS to the bucket (BucketName-APPID)")
    raise SubmitError(f"give --bucket: WEBHOOK_ALLOWED_BUCKETS names {len(allowed)} buckets ({', '.join(allowed)})")


def ci_client(settings: Settings) -> CosS3Client:
    """The SDK client for ``COS_REGION`` (the sandbox or a private endpoint with ``WEBHOOK_COS_ENDPOINT``)."""
    problems = settings.credential_problems() + ([] if settings.region else ["COS_REGION is not set"])
    if problems:
        raise SubmitError("; ".join(problems))
    return client_for(settings)


@dataclass(frozen=True)
class Submitted:
    job_id: str
    bucket: str
    input_key: str
    uploaded_from: Path | None  # the local file uploaded to ``input_key``, if one was


def submit_job(
    client: CosS3Client,
    settings: Settings,
    source: str,
    output_key: str,
    *,
    bucket: str,
    callback: str,
    callback_format: str | None,
    input_key: str | None = None,
    template_id: str = "",
    user_data: str = "",
    callback_mq: Mapping[str, str] | None = None,
) -> Submitted:
    """Upload ``source`` if it is a local file (else it is a key in ``bucket``) and submit the job.

    ``callback`` is the per-job CallBack URL; "" leaves it to the queue's NotifyConfig, unless
    ``callback_mq`` (:func:`callback_queue`) has CI put the callback on a TDMQ queue.
    """
    path = Path(source)
    uploaded_from: Path | None = None
    if path.is_file():
        key = input_key or f"input/{path.name}"
        with explained(f"uploading {path} to {bucket}/{key}", COS), path.open("rb") as body:
            # A file object is sent as the request body in chunks, never read into memory whole.
            client.put_object(Bucket=bucket, Body=body, Key=key)
        uploaded_from = path
    else:
        if input_key:
            raise SubmitError(f"--input-key is for uploads, and {source} is not a local file")
        key = source
        try:
            client.head_object(Bucket=bucket, Key=key)
        except SDK_ERRORS as exc:
            error = cloud_error(exc, COS)
            if error.status == 404:
                raise SubmitError(f"{source} is neither a local file nor an object in {bucket}") from None
            raise SubmitError(f"looking for {bucket}/{key}: {error}") from None
    output = ObjectLocation(bucket, settings.region, output_key)
    with explained(f"submitting the job for {bucket}/{key}"):
        job_id = submit_noise_reduction(
            client, key, output, callback, callback_format, user_data, template_id=template_id, callback_mq=callback_mq
        )
    return Submitted(job_id, bucket, key, uploaded_from)


@dataclass(frozen=True)
class Outcome:
    """Where following a job stopped; ``ok`` only for a job delivered as CI's success."""

    ok: bool
    status: str  # "" when no callback for the job reached the ledger
    line: str

    @property
    def exit_code(self) -> int:
        """``submit --wait``'s exit status: 0 delivered, 3 CI reports the job failed, 1 anything else."""
        return 0 if self.ok else 3 if self.status == JobStatus.FAILED else 1


def follow(
    views: Views,
    job_id: str,
    timeout: float,
    report: Callable[[str], None],
    interval: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Outcome:
    """Read the job from the ledger every ``interval`` s, reporting each new status, until it is
    final or ``timeout`` s have passed. Reads only: the command may run where no worker does."""
    deadline = clock() + timeout
    seen: str | None = None
    while True:
        try:
            view = views.show_job(job_id)
        except UnknownJob:
            status, reason, problems = "", "", ""
        else:
            status, reason = view.status, view.reason
            problems = "; ".join(
                f"{task.sink or 'verify'}: {task.last_error}"
                for task in view.tasks
                if task.status == TaskStatus.DEAD and task.last_error
            )
        if status != seen:
            seen = status
            report(f"{job_id}: {status or 'waiting for its callback'}{f' ({reason})' if reason else ''}")
        if status in FINAL:
            why = reason or problems or "no reason recorded"
            if status == JobStatus.FAILED:
                return Outcome(False, status, f"job {job_id} failed: {why}; its failure event was delivered")
            if status != JobStatus.DELIVERED:
                return Outcome(False, status, f"job {job_id} stopped at {status}: {why}")
            return Outcome(True, status, f"job {job_id} delivered")
        if clock() >= deadline:
            where = f"still {status}" if status else "no callback for it reached the ledger"
            return Outcome(False, status, f"stopped waiting after {timeout:g} s: job {job_id}: {where}")
        sleep(min(interval, max(deadline - clock(), 0.0)))
