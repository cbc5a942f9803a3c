"""What became of a task, decided by the pipeline and recorded in one place.

The pipeline's steps only decide: each attempt ends in one of the outcomes below, a value that
names the task, what happened and the attempts that led there. :class:`Recorder` records each
outcome once, as dramatiq's middleware observes a message's: the ledger row (the task closed,
scheduled again or given up, the attempts added to the job's timeline), the metrics, and the log
line. A failed attempt's outcome (retry later, give up, or abandoned by a shutdown) is decided by
:func:`after_failure` from the task's retry policy.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypedDict, Unpack

from webhook.ledger import Attempt, Delivery, DeliveryClaim, Ledger, Task, Trying, VerifyClaim, Version, utcnow
from webhook.ledger.breakers import Health
from webhook.models import Job, Outcome
from webhook.retry import BreakerPolicy, RetryPolicy, backoff_delay, why_over
from webhook.telemetry import metrics
from webhook.telemetry.logs import fields

log = logging.getLogger("webhook.worker")

Attempts = tuple[Attempt, ...]


@dataclass(frozen=True)
class Accepted:
    """Verification passed for ``version``: the job goes on to one delivery per sink in ``sinks``."""

    claim: VerifyClaim
    attempts: Attempts
    version: Version
    job: Job
    sinks: tuple[str, ...]
    rejected: Mapping[int | None, str]  # the other versions, with why each was rejected

    @property
    def task(self) -> Task:
        return self.claim.task


@dataclass(frozen=True)
class Rejected:
    """Verification refused every version: the job is never fetched nor forwarded."""

    task: Task
    attempts: Attempts
    reason: str
    rejected: Mapping[int | None, str]


@dataclass(frozen=True)
class Delivered:
    task: Delivery
    attempts: Attempts


@dataclass(frozen=True)
class RetryLater:
    """The attempt failed and may succeed later: due again after ``delay`` seconds."""

    task: Task
    attempts: Attempts
    error: str
    delay: float
    sink_failed: bool = False  # the sink itself failed (not the fetch before it): counts for its breaker


@dataclass(frozen=True)
class GaveUp:
    """Retrying cannot help, or the task's retry budget is spent: it is dead."""

    task: Task
    attempts: Attempts
    error: str
    sink_failed: bool = False  # as in RetryLater


@dataclass(frozen=True)
class Abandoned:
    """Cut off by a shutdown: due again at once, for a worker that is not stopping."""

    task: Task
    attempts: Attempts
    error: str


TaskOutcome = Accepted | Rejected | Delivered | RetryLater | GaveUp | Abandoned
Failed = RetryLater | GaveUp | Abandoned


class FailureDetails(TypedDict, total=False):
    """What else is known about a failed attempt (see :func:`after_failure`)."""

    also: Sequence[Trying]
    recorded: Sequence[Attempt]
    retry_after: float | None
    final: str | None
    delay: float | None
    code: str
    sink_failed: bool


def after_failure(
    task: Task,
    received_at: datetime,
    error: str,
    policy: RetryPolicy,
    tried: Trying,
    *,
    abandoned: str | None = None,
    **details: Unpack[FailureDetails],
) -> Failed:
    """What a failed attempt at ``task`` comes to: abandoned, dead once retrying cannot help, else a retry.

    ``abandoned`` is the shutdown's reason when the worker's work in hand is being cut off.
    ``final`` says why retrying cannot help at all (e.g. "refused permanently"); the dead task's
    error then says so, as it says when the attempts or ``max_age`` ran out. ``tried`` and
    ``also`` (a fetch the task depended on) end with this outcome, after the attempts already
    ``recorded``. ``delay`` overrides the backoff (deliveries kept due together).
    """
    also, recorded, code = details.get("also", ()), details.get("recorded", ()), details.get("code", "")
    sink_failed = details.get("sink_failed", False)
    if abandoned is not None:
        error = f"{error} ({abandoned})"
        return Abandoned(task, _ended(recorded, also, tried, Outcome.ABANDONED, error, code), error)
    over = why_over(task.attempts, policy, (utcnow() - received_at).total_seconds(), details.get("final"))
    if over is not None:
        error = f"{error} ({over})"
        return GaveUp(task, _ended(recorded, also, tried, Outcome.DEAD, error, code), error, sink_failed)
    if (delay := details.get("delay")) is None:
        delay = backoff_delay(task.attempts, policy, details.get("retry_after"))
    return RetryLater(task, _ended(recorded, also, tried, Outcome.RETRY, error, code), error, delay, sink_failed)


def _ended(
    recorded: Sequence[Attempt], also: Sequence[Trying], tried: Trying, outcome: Outcome, error: str, code: str
) -> Attempts:
    return (*recorded, *(trying.ended(outcome, error, code) for trying in (*also, tried)))


class Recorder:
    """Records each outcome once: the ledger row (with what it says of a sink, for the sink's
    breaker), the metrics, the log line."""

    def __init__(
        self,
        ledger: Ledger,
        worker_id: str,
        lease_seconds: float,
        breakers: Mapping[str, BreakerPolicy] | None = None,
    ) -> None:
        self.queue = ledger.queue
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.breakers = breakers or {}  # each sink's; a sink not named here has the default

    def record(
        self, outcome: TaskOutcome, received_at: datetime, lease: Sequence[str] | None = None
    ) -> DeliveryClaim | None:
        """Record ``outcome`` of a claim whose job was first recorded at ``received_at``.

        For :class:`Accepted`, the job's deliveries to the sinks in ``lease`` (None: every sink),
        leased to this worker in the same transaction (None if the lease was lost or none was
        leased); the job's other deliveries are due for a claim of their own. Else None.
        """
        metrics.attempted(outcome.attempts, received_at)
        task, worker, health = outcome.task, self.worker_id, self._health(outcome)
        match outcome:
            case Accepted(claim, attempts, version, job, sinks, rejected):
                deliveries = self.queue.accept_and_claim(
                    claim, worker, sinks, version, job, rejected, attempts, self.lease_seconds, lease
                )
                log.info("verified state=%s deliveries=%s", job.state, ",".join(sinks), extra=fields(job))
                return deliveries
            case Rejected(_, attempts, reason, rejected):
                self.queue.reject(task, worker, reason, rejected, attempts)
                log.warning("rejected: %s", reason, extra=fields(task))
            case Delivered(delivery, attempts):
                if self.queue.complete(delivery, worker, attempts, health):
                    log.info("delivered attempt=%d", delivery.attempts, extra=fields(delivery))
                else:
                    log.warning("delivered but the lease was lost", extra=fields(delivery))
            case Abandoned(_, attempts, error):
                self.queue.retry_later(task, worker, error, 0.0, attempts)
                log.warning("attempt %d abandoned at shutdown: %s", task.attempts, error, extra=fields(task, step=True))
            case GaveUp(_, attempts, error):
                self.queue.give_up(task, worker, error, attempts, health)
                log.error("dead after %d attempts: %s", task.attempts, error, extra=fields(task, step=True))
            case RetryLater(_, attempts, error, delay):
                self.queue.retry_later(task, worker, error, delay, attempts, health)
                log.warning(
                    "attempt %d failed, retry in %.1fs: %s", task.attempts, delay, error, extra=fields(task, step=True)
                )
        return None

    def _health(self, outcome: TaskOutcome) -> Health | None:
        """What ``outcome`` says of its sink: a delivery done, or the sink's own failure (a failed
        fetch or a shutdown says nothing of it)."""
        if not isinstance(outcome.task, Delivery):
            return None
        ok = isinstance(outcome, Delivered)
        if not ok and not (isinstance(outcome, RetryLater | GaveUp) and outcome.sink_failed):
            return None
        sink = outcome.task.sink
        policy = self.breakers.get(sink, BreakerPolicy())
        return Health(sink, ok, policy.failures, policy.pause)
