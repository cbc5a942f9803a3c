"""What a worker leases from the queue: typed claims over tasks, as plain data.

A claim carries the job as stored (JSON), not decoded: the worker decodes it, so a row it
cannot read becomes that task's failure instead of stopping the queue. The same holds for a
typed column that holds something its type cannot: the claim says so in ``unreadable``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from webhook.ledger.schema import utcnow
from webhook.models import Outcome, Step, TaskKind


@dataclass(frozen=True)
class Task:
    id: int
    job_id: str
    kind: TaskKind
    attempts: int  # including the one this claim started


@dataclass(frozen=True)
class Delivery(Task):
    sink: str


@dataclass(frozen=True)
class Version:
    """What one callback said about the job, as stored."""

    id: int | None  # None: a job recorded before versions were kept, read from the job row
    detail: str


@dataclass(frozen=True)
class VerifyClaim:
    """A job's verify task, leased to one worker, with every version of the job still to verify."""

    task: Task
    versions: tuple[Version, ...]
    received_at: datetime  # when the job was first recorded (naive UTC)
    # Why a typed column of the job's or the task's row cannot be read ("" when it can): the
    # pipeline makes the task dead with this reason, with nothing else tried.
    unreadable: str = ""

    @property
    def tasks(self) -> tuple[Task, ...]:
        return (self.task,)


@dataclass(frozen=True)
class DeliveryClaim:
    """Every due delivery of one job, leased to one worker: one fetch serves them all."""

    detail: str  # the verified job, as stored
    deliveries: tuple[Delivery, ...]
    received_at: datetime
    delivered_to: frozenset[str] = frozenset()  # sinks that already have this job
    # Sinks whose delivery of this job is still to come in another claim (not due yet, or leased
    # elsewhere): the job's staged files are kept for them.
    pending_elsewhere: frozenset[str] = frozenset()
    unreadable: str = ""  # as in VerifyClaim

    @property
    def tasks(self) -> tuple[Task, ...]:
        return self.deliveries


Claim = VerifyClaim | DeliveryClaim


@dataclass(frozen=True)
class Room:
    """A worker's free slots: for verifications, and for each sink's deliveries (its bulkhead)."""

    verify: int
    sinks: Mapping[str, int]

    @property
    def total(self) -> int:
        return self.verify + sum(self.sinks.values())


@dataclass(frozen=True)
class Attempt:
    """One try at a step, for the job's timeline: recorded with the outcome it led to."""

    step: Step
    sink: str  # "" for verify and fetch
    started_at: datetime  # naive UTC
    duration_ms: int
    outcome: Outcome = Outcome.OK
    code: str = ""  # the remote's status or error code, when it answered
    error: str = ""


class Trying:
    """An attempt under way: it knows when it started, so it ends as an :class:`Attempt` with its duration."""

    def __init__(self, step: Step, sink: str = "") -> None:
        self.step, self.sink = step, sink
        self.started_at, self._clock = utcnow(), time.monotonic()

    def ended(self, outcome: Outcome, error: str = "", code: str = "") -> Attempt:
        duration_ms = int((time.monotonic() - self._clock) * 1000)
        return Attempt(self.step, self.sink, self.started_at, duration_ms, outcome, code, error)
