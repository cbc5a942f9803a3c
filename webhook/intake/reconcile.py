"""Reconcile: find finished jobs whose callback never came, and record them as if it had.

Tencent documents no retry of a callback that fails; its safety net is to list jobs with the CI
API (DescribeMediaJobs, ``GET /jobs``). :func:`reconcile` lists the finished NoiseReduction jobs
of every allowlisted bucket created since a given time, and records each one the ledger does not
have through the same ingest path as a received callback (:func:`~webhook.intake.record.record_unless_known`),
marked as found by reconcile: a job another run recorded meanwhile is not stored again. From
there the worker verifies, fetches and delivers it like any other.

:func:`to_record` is the pure decision; :func:`~webhook.ci.listing.list_finished` (the CI API)
and :meth:`~webhook.ledger.jobs.Jobs.known` (a read-only query on the ledger) are the I/O edges.
:class:`PeriodicReconcile` is the worker's service that runs it on its own, one worker at a time.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Sequence, Set
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from webhook.ci.client import CloudError, client_for
from webhook.ci.listing import FINISHED, Listed, creation_time, list_finished
from webhook.config import Settings
from webhook.intake.record import record_unless_known
from webhook.intake.triage import FORWARDED_EVENT
from webhook.ledger import Ledger, RawRequest, utc_text, utcnow
from webhook.models import Callback
from webhook.telemetry.logs import escape
from webhook.worker.periodic import Periodic

log = logging.getLogger(__name__)

FOUND_BY = {"X-Found-By": "reconcile"}  # stored with the request, so `jobs show` can tell it from a callback
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
    # The window's start. CI is asked in its own zone (UTC+8, creation_time); people and JSON
    # readers are told it in UTC, as every other time this service prints.
    since: datetime
    buckets: tuple[BucketResult, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "since": utc_text(self.since),
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
            f"reconcile since {utc_text(self.since)}: {totals['listed']} finished jobs listed, "
            f"{totals['already_known']} already known, {len(totals['recorded'])} recorded ({per_bucket})"
        )


def to_record(listed: Sequence[Listed], known: Set[str]) -> list[Listed]:
    """The listed jobs to record: finished, not in the ledger, each once (pages can overlap)."""
    wanted: dict[str, Listed] = {}
    for item in listed:
        if item.job.state in FINISHED and item.job.job_id not in known:
            wanted.setdefault(item.job.job_id, item)
    return list(wanted.values())


def reconcile(
    settings: Settings, ledger: Ledger, since: datetime, progress: Callable[[str], None] | None = None
) -> Summary:
    """List the finished jobs of every allowlisted bucket created after ``since`` and record the missing ones.

    Buckets are listed in ``COS_REGION`` (a bucket lives in one region, and the settings do not say
    which of several allowed regions holds which bucket). Raises :class:`ReconcileError` on the
    first bucket CI cannot list; what was recorded before stays (a second run records nothing twice).
    ``progress`` hears where a long run is, page by page and job by job.
    """
    say = progress or (lambda _: None)

    def pages(bucket: str, listed: int) -> None:
        say(f"{bucket}: {listed} jobs listed")

    client = client_for(settings)
    start = creation_time(since)  # CI's parameter, in CI's format
    results = []
    for bucket in sorted(settings.allowed_buckets):
        try:
            queues = settings.reconcile_queue_ids
            listed = list_finished(client, bucket, start, queues, functools.partial(pages, bucket))
        except CloudError as exc:
            raise ReconcileError(bucket, str(exc)) from None
        listed_ids = {item.job.job_id for item in listed}
        known = ledger.jobs.known(sorted(listed_ids))
        missing = to_record(listed, known)
        recorded: list[str] = []
        for done, item in enumerate(missing, start=1):
            recorded += record(ledger, item, settings)
            say(f"{bucket}: {len(listed_ids)} listed, {done}/{len(missing)} recorded")
        results.append(BucketResult(bucket, settings.region, len(listed_ids), len(known), tuple(recorded)))
    return Summary(since, tuple(results))


def record(ledger: Ledger, item: Listed, settings: Settings) -> tuple[str, ...]:
    """Record ``item`` as the callback CI would have sent for it; the ids the ledger took as new."""
    raw = RawRequest(
        body=json.dumps(item.detail).encode(),
        content_type="application/json",
        headers=dict(FOUND_BY),
        remote_addr="reconcile",
    )
    callback = Callback(event_name=FORWARDED_EVENT, jobs=(item.job,), body_format="json")
    # Another run (the CLI's, another worker's) may have recorded the job since it was looked up.
    recorded = record_unless_known(ledger, raw, callback, settings.allowed_tags)
    if recorded is None:
        return ()
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
            totals["since"],
            totals["listed"],
            totals["already_known"],
            len(recorded),
            named or "-",
        )
        return summary

    def reason(self, exc: Exception) -> str:
        return self.settings.redact(str(exc) if isinstance(exc, ReconcileError) else super().reason(exc))
