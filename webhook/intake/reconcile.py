"""Reconcile: find finished jobs whose callback never came, and record them as if it had.

Tencent documents no retry of a callback that fails; its safety net is to list jobs with the CI
API (DescribeMediaJobs, ``GET /jobs``). :func:`reconcile` lists the finished NoiseReduction jobs
of every allowlisted bucket created since a given time, and records each one the ledger does not
have through the same ingest path as a received callback (``Jobs.record`` after ``triage``), marked
as found by reconcile. From there the worker verifies, fetches and delivers it like any other.

:func:`to_record` is the pure decision; :func:`list_finished` (the SDK) and :func:`known_job_ids`
(a read-only query on the ledger) are the I/O edges. :class:`PeriodicReconcile` is the worker's
service that runs it on its own, one worker at a time.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence, Set
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa
from qcloud_cos import CosS3Client
from qcloud_cos.cos_exception import CosClientError, CosServiceError
from sqlalchemy.engine import Engine

from webhook.ci.client import client_error, service_error
from webhook.config import Settings
from webhook.intake.callback import CallbackError, parse_job
from webhook.intake.triage import FORWARDED_EVENT, triage
from webhook.ledger import Ledger, RawRequest, utcnow
from webhook.ledger.schema import jobs
from webhook.models import Callback, Job, JobState
from webhook.telemetry.logs import escape
from webhook.worker.periodic import Periodic

log = logging.getLogger(__name__)

TAG = "NoiseReduction"
FINISHED = (JobState.SUCCESS, JobState.FAILED, JobState.CANCEL)
PAGE_SIZE = 100  # the largest page DescribeMediaJobs gives
FOUND_BY = {"X-Found-By": "reconcile"}  # stored with the request, so `jobs show` can tell it from a callback
_BEIJING = timezone(timedelta(hours=8))  # CI's examples write every time in UTC+8
_IDS_PER_QUERY = 500  # well under every database's limit of bound parameters
LOCK = "reconcile"  # the ledger lock that lets one worker at a time run it
# How much further back than two intervals a worker's run lists. CI lists jobs by creation time,
# so a job is only found while its creation is inside the window: this covers jobs that ran this
# long, and clocks (this host's, CI's) that disagree by a few minutes.
RUNTIME_MARGIN = 3600.0
_LOGGED_IDS = 50  # job ids named in a run's log line; each recorded job also has its own line


class ReconcileError(Exception):
    """CI could not be asked, or answered something unreadable, about ``bucket``."""

    def __init__(self, bucket: str, message: str) -> None:
        super().__init__(f"bucket {bucket}: {message}")
        self.bucket = bucket


@dataclass(frozen=True)
class Listed:
    """A job as DescribeMediaJobs listed it: parsed, and the ``JobsDetail`` element it came from."""

    job: Job
    detail: dict[str, Any]


@dataclass(frozen=True)
class BucketResult:
    bucket: str
    region: str
    listed: int  # distinct finished jobs CI listed
    already_known: int  # of those, in the ledger before this run
    recorded: tuple[str, ...]  # job ids this run recorded

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"recorded": list(self.recorded)}


@dataclass(frozen=True)
class Summary:
    since: str  # the window's start, as sent to CI
    buckets: tuple[BucketResult, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "listed": sum(b.listed for b in self.buckets),
            "already_known": sum(b.already_known for b in self.buckets),
            "recorded": [job_id for b in self.buckets for job_id in b.recorded],
            "buckets": [b.to_dict() for b in self.buckets],
        }

    def line(self) -> str:
        """One line for people: the totals, then each bucket's."""
        totals = self.to_dict()
        per_bucket = "; ".join(
            f"{b.bucket}: {b.listed} listed, {b.already_known} known, {len(b.recorded)} recorded" for b in self.buckets
        )
        return (
            f"reconcile since {self.since}: {totals['listed']} finished jobs listed, "
            f"{totals['already_known']} already known, {len(totals['recorded'])} recorded ({per_bucket})"
        )


def creation_time(when: datetime) -> str:
    """``when`` (naive UTC, or aware) as DescribeMediaJobs takes it: ``2001-01-01T08:00:00+0800``."""
    aware = when if when.tzinfo else when.replace(tzinfo=UTC)
    return aware.astimezone(_BEIJING).strftime("%Y-%m-%dT%H:%M:%S%z")


def to_record(listed: Sequence[Listed], known: Set[str]) -> list[Listed]:
    """The listed jobs to record: finished, not in the ledger, each once (pages can overlap)."""
    wanted: dict[str, Listed] = {}
    for item in listed:
        if item.job.state in FINISHED and item.job.job_id not in known:
            wanted.setdefault(item.job.job_id, item)
    return list(wanted.values())


def reconcile(settings: Settings, ledger: Ledger, since: datetime) -> Summary:
    """List the finished jobs of every allowlisted bucket created after ``since`` and record the missing ones.

    Buckets are listed in ``COS_REGION`` (a bucket lives in one region, and the settings do not say
    which of several allowed regions holds which bucket). Raises :class:`ReconcileError` on the
    first bucket CI cannot list; what was recorded before stays (a second run records nothing twice).
    """
    client = settings.cos_client()
    start = creation_time(since)
    results = []
    for bucket in sorted(settings.allowed_buckets):
        listed = list_finished(client, bucket, start, settings.reconcile_queue_ids)
        listed_ids = {item.job.job_id for item in listed}
        known = known_job_ids(ledger.engine, sorted(listed_ids))
        recorded = [job_id for item in to_record(listed, known) for job_id in record(ledger, item, settings)]
        results.append(BucketResult(bucket, settings.region, len(listed_ids), len(known), tuple(recorded)))
    return Summary(start, tuple(results))


def list_finished(client: CosS3Client, bucket: str, start: str, queue_ids: Sequence[str]) -> list[Listed]:
    """Every finished job of ``bucket`` created after ``start``, of ``queue_ids`` (none: every queue), page by page."""
    listed: list[Listed] = []
    for queue_id in queue_ids or (None,):
        token = ""
        while True:
            answer = _list_page(client, bucket, start, queue_id, token)
            for index, item in enumerate(answer.get("JobsDetail") or []):
                try:
                    listed.append(Listed(parse_job(item, f"DescribeMediaJobs JobsDetail[{index}]"), item))
                except CallbackError as exc:
                    raise ReconcileError(bucket, f"unreadable DescribeMediaJobs answer: {exc.message}") from None
            next_token = answer.get("NextToken") or ""
            # The last page has an empty token; one that does not move on would page forever.
            if not next_token or next_token == token:
                break
            token = next_token
    return listed


def _list_page(client: CosS3Client, bucket: str, start: str, queue_id: str | None, token: str) -> dict[str, Any]:
    try:
        answer: dict[str, Any] = client.ci_list_media_jobs(
            Bucket=bucket,
            Tag=TAG,
            QueueId=queue_id,
            StartCreationTime=start,
            OrderByTime="Asc",
            States=",".join(FINISHED),
            Size=PAGE_SIZE,
            NextToken=token,
        )
    except CosServiceError as exc:
        code, detail = service_error(exc)
        raise ReconcileError(bucket, f"CI answered {code}: {detail}") from None
    except CosClientError as exc:
        raise ReconcileError(bucket, f"CI API unreachable: {client_error(exc)}") from None
    return answer


def known_job_ids(engine: Engine, job_ids: Sequence[str]) -> set[str]:
    """Which of ``job_ids`` the ledger has (read-only, a few ids per query)."""
    known: set[str] = set()
    with engine.connect() as conn:
        for first in range(0, len(job_ids), _IDS_PER_QUERY):
            chunk = job_ids[first : first + _IDS_PER_QUERY]
            known.update(conn.execute(sa.select(jobs.c.job_id).where(jobs.c.job_id.in_(chunk))).scalars())
    return known


def record(ledger: Ledger, item: Listed, settings: Settings) -> tuple[str, ...]:
    """Record ``item`` as the callback CI would have sent for it; the ids the ledger took as new."""
    raw = RawRequest(
        body=json.dumps(item.detail).encode(),
        content_type="application/json",
        headers=dict(FOUND_BY),
        remote_addr="reconcile",
    )
    callback = Callback(event_name=FORWARDED_EVENT, jobs=(item.job,), body_format="json")
    recorded = ledger.jobs.record(raw, callback, triage(callback, settings.allowed_tags))
    for job_id in recorded.job_ids:
        log.info("reconcile recorded state=%s", item.job.state, extra={"job_id": job_id})
    return recorded.job_ids


class PeriodicReconcile(Periodic[Summary]):
    """The worker's service that runs :func:`reconcile` every ``settings.reconcile_interval`` seconds,
    one worker at a time (see :class:`~webhook.worker.periodic.Periodic`).

    Runs are at most about two intervals apart (when the lock's holder stops, another takes over
    once it runs out), so each run lists the jobs created in the last ``2 * interval +
    RUNTIME_MARGIN`` seconds: consecutive windows overlap, and a job that finished just around one
    run is listed by the next (found once: jobs are known by id). ``recorded`` counts the jobs
    this process's runs recorded.
    """

    lock = LOCK

    def __init__(
        self, settings: Settings, ledger: Ledger, holder: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(ledger, holder, settings.reconcile_interval, clock)
        self.settings = settings
        self.recorded = 0  # jobs this process's runs recorded

    def window(self, now: datetime) -> datetime:
        """Where the run at ``now`` starts listing: two intervals and :data:`RUNTIME_MARGIN` back."""
        return now - timedelta(seconds=2 * self.interval + RUNTIME_MARGIN)

    def work(self) -> Summary:
        summary = reconcile(self.settings, self.ledger, self.window(utcnow()))
        totals = summary.to_dict()
        recorded = totals["recorded"]
        self.recorded += len(recorded)
        named = ",".join(escape(job_id) for job_id in recorded[:_LOGGED_IDS])
        if len(recorded) > _LOGGED_IDS:
            named += f",+{len(recorded) - _LOGGED_IDS} more"
        log.info(
            "reconcile since=%s listed=%d known=%d recorded=%d jobs=%s",
            summary.since,
            totals["listed"],
            totals["already_known"],
            len(recorded),
            named or "-",
        )
        return summary

    def reason(self, exc: Exception) -> str:
        return self.settings.redact(str(exc) if isinstance(exc, ReconcileError) else super().reason(exc))
