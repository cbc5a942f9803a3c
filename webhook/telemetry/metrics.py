"""Prometheus metrics: what each process counts, and the ledger's gauges, read when scraped.

Counters and histograms are module-level and counted where things happen (the receiver, the
worker). Under gunicorn every web process writes them to files in ``PROMETHEUS_MULTIPROC_DIR``
(see :mod:`webhook.telemetry.metrics_dir`) and whichever process is scraped sums all of them. The ledger's
gauges are different: they describe the shared ledger, not a process, so the scraped process
reads them itself (never summed across processes), at most once per :data:`LEDGER_CACHE_SECONDS`
however many scrapers call. The text itself is rendered at most once per :data:`RENDER_CACHE_SECONDS`
(:class:`Exposition`).
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase, disable_created_metrics
from prometheus_client.multiprocess import MultiProcessCollector

from webhook.ledger import Attempt, LedgerUnavailable, Recorded, utcnow
from webhook.ledger.breakers import State
from webhook.ledger.stats import LedgerStats, TaskGroup
from webhook.models import Outcome, Step, TaskKind
from webhook.telemetry.metrics_dir import VARIABLE

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
LEDGER_CACHE_SECONDS = 5.0
RENDER_CACHE_SECONDS = 1.0

# ``*_created`` series exist in one process but not when summed across several: none, everywhere.
disable_created_metrics()  # type: ignore[no-untyped-call]


class CallbackOutcome(enum.StrEnum):
    """How a callback was answered."""

    STORED = "stored"  # 200: at least one job new to the ledger (or a new version of one) to verify
    DUPLICATE = "duplicate"  # 200: every job was already recorded as sent
    IGNORED = "ignored"  # 200: recorded only (another event or tag)
    REFUSED_4XX = "refused_4xx"  # unknown token, source not allowed, malformed or too large
    UNAVAILABLE_503 = "unavailable_503"  # the ledger could not commit: the sender should retry
    ERROR_5XX = "error_5xx"  # any other failure: a bug, should stay 0


_OWN = CollectorRegistry()  # this process's counters and histograms (the default registry is left alone)

CALLBACKS = Counter(
    "cos_webhook_callbacks",
    "Callbacks answered, by outcome: stored, duplicate, ignored, refused_4xx, unavailable_503 (error_5xx: a bug).",
    ["outcome"],
    registry=_OWN,
)
VERIFICATIONS = Counter(
    "cos_webhook_verifications",
    "Verification attempts (DescribeMediaJob compared with the callback), by outcome: "
    "ok, rejected, retry, dead, abandoned.",
    ["outcome"],
    registry=_OWN,
)
DELIVERIES = Counter(
    "cos_webhook_deliveries",
    "Delivery attempts per sink, by outcome: ok, retry, dead, abandoned.",
    ["sink", "outcome"],
    registry=_OWN,
)
CAPPED_VERSIONS = Counter(
    "cos_webhook_capped_versions",
    "New versions of a job kept but not verified: the job already had WEBHOOK_MAX_VERSIONS_PER_JOB versions.",
    registry=_OWN,
)
ACK_SECONDS = Histogram(
    "cos_webhook_ack_seconds",
    "Seconds from a callback's arrival to its answer (the 200 comes after the ledger commit).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=_OWN,
)
STEP_SECONDS = Histogram(
    "cos_webhook_step_seconds",
    "Seconds one attempt at a step took: verify, fetch, deliver (one sink), whatever its outcome.",
    ["step"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0),
    registry=_OWN,
)
DELIVERY_LATENCY = Histogram(
    "cos_webhook_delivery_latency_seconds",
    "Seconds from a job's first callback being stored to its delivery to the sink (replays included).",
    ["sink"],
    # From tens of milliseconds (an idle worker is woken at once) to a day of retries.
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 21600, 86400),
    registry=_OWN,
)
_COUNTED: tuple[MetricWrapperBase, ...] = (
    CALLBACKS,
    VERIFICATIONS,
    DELIVERIES,
    CAPPED_VERSIONS,
    ACK_SECONDS,
    STEP_SECONDS,
    DELIVERY_LATENCY,
)

# Every known label value starts at 0, so a rate is defined from the first event on.
for _outcome in CallbackOutcome:
    CALLBACKS.labels(_outcome.value)
for _verified in Outcome:
    if _verified != Outcome.REPLAYED:  # a mark in the timeline, never counted as an attempt
        VERIFICATIONS.labels(_verified.value)
for _step in Step:
    STEP_SECONDS.labels(_step.value)


# -- counting ----------------------------------------------------------------------------------


def stored_outcome(recorded: Recorded) -> CallbackOutcome:
    """What a callback the ledger took (answered 200) counts as."""
    if set(recorded.job_ids) - set(recorded.ignored):
        return CallbackOutcome.STORED
    if recorded.ignored:
        return CallbackOutcome.IGNORED
    return CallbackOutcome.DUPLICATE if recorded.duplicates else CallbackOutcome.STORED


def callback_answered(status: int, outcome: CallbackOutcome | None, seconds: float | None) -> None:
    """Count one answer to ``POST /callback/…``; ``outcome`` is known for a 200, derived otherwise."""
    if outcome is None:
        if 400 <= status < 500:
            outcome = CallbackOutcome.REFUSED_4XX
        elif status == 503:
            outcome = CallbackOutcome.UNAVAILABLE_503
        else:
            outcome = CallbackOutcome.STORED if status < 400 else CallbackOutcome.ERROR_5XX
    CALLBACKS.labels(outcome.value).inc()
    if seconds is not None:
        ACK_SECONDS.observe(seconds)


def versions_capped(count: int) -> None:
    """Count versions a recording kept without verifying them (their job had its most versions)."""
    if count:
        CAPPED_VERSIONS.inc(count)


def expect_sinks(names: Iterable[str]) -> None:
    """Start each sink's delivery series at 0 (a worker calls it with its sinks)."""
    for sink in names:
        DELIVERY_LATENCY.labels(sink)
        for outcome in (Outcome.OK, Outcome.RETRY, Outcome.DEAD, Outcome.ABANDONED):
            DELIVERIES.labels(sink, outcome.value)


def attempted(attempts: Iterable[Attempt], received_at: datetime) -> None:
    """Count what a worker tried, as it records it in the ledger: each attempt's time by step, each
    verification's and delivery's outcome, and for a delivery done the time since the job was stored."""
    for attempt in attempts:
        STEP_SECONDS.labels(attempt.step.value).observe(attempt.duration_ms / 1000)
        if attempt.step == Step.VERIFY:
            VERIFICATIONS.labels(attempt.outcome.value).inc()
        elif attempt.step == Step.DELIVER:
            DELIVERIES.labels(attempt.sink, attempt.outcome.value).inc()
            if attempt.outcome == Outcome.OK:
                DELIVERY_LATENCY.labels(attempt.sink).observe(max(0.0, (utcnow() - received_at).total_seconds()))


# -- exposition ----------------------------------------------------------------------------------


class _Counted:
    """The counters and histograms: this process's, or under gunicorn every web process's, summed."""

    def __init__(self) -> None:
        directory = os.environ.get(VARIABLE)
        self._files = MultiProcessCollector(None, directory) if directory else None  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        if self._files is None:
            yield from _OWN.collect()
            return
        seen = set()
        for family in self._files.collect():  # type: ignore[no-untyped-call]
            seen.add(family.name)
            yield family
        # A metric no process has touched has no file entry; still say what it is.
        for metric in _COUNTED:
            for family in metric.describe():
                if family.name not in seen:
                    yield family


class LedgerCollector:
    """The ledger-derived gauges, read through ``read`` at most once per ``ttl`` seconds.

    Concurrent scrapes wait for the one read in flight instead of starting their own. When the
    ledger cannot be read, the gauges are listed without samples until the next read.
    """

    def __init__(
        self,
        read: Callable[[], LedgerStats],
        ttl: float = LEDGER_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read, self._ttl, self._clock = read, ttl, clock
        self._lock = threading.Lock()
        self._stats: LedgerStats | None = None
        self._read_at: float | None = None

    def snapshot(self) -> LedgerStats | None:
        """The cached stats, read again once they are ``ttl`` old; None if the last read failed."""
        with self._lock:
            if self._read_at is None or self._clock() - self._read_at >= self._ttl:
                try:
                    self._stats = self._read()
                except LedgerUnavailable as exc:
                    log.warning("metrics: ledger gauges unavailable (%s: %s)", exc.kind, exc.detail)
                    self._stats = None
                self._read_at = self._clock()
            return self._stats

    def collect(self) -> Iterator[Metric]:
        stats = self.snapshot()
        jobs = GaugeMetricFamily(
            "cos_webhook_jobs", "Jobs in the ledger by status (every status, 0 included).", labels=["status"]
        )
        due = GaugeMetricFamily(
            "cos_webhook_tasks_due",
            "Tasks a worker may claim now (pending, due, not leased), by kind (verify, deliver) and sink.",
            labels=["kind", "sink"],
        )
        lag = GaugeMetricFamily(
            "cos_webhook_task_lag_seconds",
            "How long the oldest task a worker may claim has been due, by kind and sink (0: none waits).",
            labels=["kind", "sink"],
        )
        dead = GaugeMetricFamily(
            "cos_webhook_dead", "Dead tasks (replayable), by kind and sink.", labels=["kind", "sink"]
        )
        live = GaugeMetricFamily("cos_webhook_workers", "Workers with a recent heartbeat in the ledger.")
        breaker = GaugeMetricFamily(
            "cos_webhook_sink_breaker",
            "Each sink's circuit breaker: 1 for its state (closed, open: paused, probing: one delivery tries it).",
            labels=["sink", "state"],
        )
        paused = GaugeMetricFamily(
            "cos_webhook_sink_paused_deliveries",
            "Due deliveries that wait, spending no attempt, because their sink's breaker is open or probing.",
            labels=["sink"],
        )
        if stats is not None:
            for status, count in sorted(stats.jobs.items()):
                jobs.add_metric([status], count)
            for group in stats.groups:
                due.add_metric(list(group), stats.due.get(group, 0))
                lag.add_metric(list(group), stats.oldest_due_seconds.get(group, 0.0))
                dead.add_metric(list(group), stats.dead.get(group, 0))
            live.add_metric([], stats.live_workers)
            sinks = {group.sink for group in stats.groups if group.kind == TaskKind.DELIVER} | set(stats.breakers)
            for sink in sorted(sinks):
                state = stats.breakers[sink].state if sink in stats.breakers else State.CLOSED
                for each in State:
                    breaker.add_metric([sink, each.value], 1 if each == state else 0)
                waiting = 0 if state == State.CLOSED else stats.due.get(TaskGroup(TaskKind.DELIVER.value, sink), 0)
                paused.add_metric([sink], waiting)
        yield from (jobs, due, lag, dead, live, breaker, paused)


def registry(read: Callable[[], LedgerStats]) -> CollectorRegistry:
    """What a ``/metrics`` endpoint serves: the counted metrics, and the ledger's gauges via ``read``."""
    served = CollectorRegistry()
    served.register(_Counted())
    served.register(LedgerCollector(read, LEDGER_CACHE_SECONDS))
    return served


class Exposition:
    """The Prometheus text (:data:`CONTENT_TYPE`) of ``served``, rendered at most once per ``ttl`` seconds.

    Rendering some ninety samples (under gunicorn, after reading every process's file) costs several
    times what answering ``/livez`` does, and a flood of scrapes would take that from the callbacks
    answered meanwhile; kept for a second, a flood costs about what a flood of ``/livez`` does, while
    a scrape (every 15 s or so) sees counts at most a second old. Concurrent scrapes wait for the one
    rendering in flight.
    """

    def __init__(self, served: CollectorRegistry, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._served, self._ttl, self._clock = served, ttl, clock
        self._lock = threading.Lock()
        self._text = b""
        self._rendered_at: float | None = None

    def text(self) -> bytes:
        with self._lock:
            if self._rendered_at is None or self._clock() - self._rendered_at >= self._ttl:
                self._text = generate_latest(self._served)
                self._rendered_at = self._clock()
            return self._text
