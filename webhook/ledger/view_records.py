"""What operators read, as plain data: the records :class:`~webhook.ledger.views.Views` returns.

A time or number a row holds that its type cannot is None in its record, whose ``unreadable``
names the column and the value (see :mod:`webhook.ledger.readable`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from webhook.models import Job, TaskKind, TaskStatus, job_to_dict


@dataclass(frozen=True)
class DeadLetter:
    """A task that ran out of attempts (or was refused for good): a verification or a delivery."""

    kind: str  # "verify" or "deliver"
    job_id: str
    sink: str | None  # None for a verification
    attempts: int | None  # None (and dead_at too) when the stored value cannot be read
    last_error: str
    dead_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"dead_at": _iso(self.dead_at)}


@dataclass(frozen=True)
class TaskView:
    kind: str
    sink: str | None  # None for a verify task
    status: str
    attempts: int | None  # None (and the times too) when the stored value cannot be read
    last_error: str
    run_after: datetime | None
    done_at: datetime | None
    unreadable: str = ""  # which of the row's columns cannot be read, and its value

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sink": self.sink} if self.kind == TaskKind.DELIVER else {}
        out |= {
            "status": self.status,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "next_attempt_at": _iso(self.run_after) if self.status == TaskStatus.PENDING else None,
            "done_at": _iso(self.done_at),
        }
        return out | ({"unreadable": self.unreadable} if self.unreadable else {})


@dataclass(frozen=True)
class VersionView:
    """What one callback said about the job, and what verification made of it."""

    callback_id: int
    received_at: datetime | None  # None when the stored value cannot be read (``unreadable`` says why)
    status: str
    reason: str
    unreadable: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _without_unreadable(asdict(self) | {"received_at": _iso(self.received_at)})


@dataclass(frozen=True)
class AttemptView:
    """One try at a step, in the job's timeline."""

    step: str  # verify, fetch, deliver
    sink: str | None  # None for verify and fetch
    started_at: datetime | None  # None (and duration_ms too) when the stored value cannot be read
    duration_ms: int | None
    outcome: str
    code: str
    error: str
    worker_id: str
    unreadable: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _without_unreadable(asdict(self) | {"started_at": _iso(self.started_at)})


@dataclass(frozen=True)
class RawCallback:
    """A stored request that named the job, as it arrived (or as reconcile found the job)."""

    id: int
    received_at: datetime | None  # None when the stored value cannot be read (``unreadable`` says why)
    remote_addr: str
    content_type: str
    headers: str  # JSON
    body: bytes
    unreadable: str = ""


@dataclass(frozen=True)
class JobView:
    job_id: str
    tag: str
    event_name: str
    state: str
    status: str
    reason: str
    created_at: datetime | None  # None when the stored value cannot be read (``unreadable`` says why)
    updated_at: datetime | None
    job: Job | None  # None when the stored detail cannot be read (``unreadable`` says why)
    unreadable: str = ""  # what of the row cannot be read, each "; "-separated
    tasks: tuple[TaskView, ...] = ()
    versions: tuple[VersionView, ...] = ()
    attempts: tuple[AttemptView, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "tag": self.tag,
            "event_name": self.event_name,
            "state": self.state,
            "status": self.status,
            "reason": self.reason,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "verify": [t.to_dict() for t in self.tasks if t.kind == TaskKind.VERIFY],
            "deliveries": [t.to_dict() for t in self.tasks if t.kind == TaskKind.DELIVER],
            "callbacks": [v.to_dict() for v in self.versions],
            "attempts": [a.to_dict() for a in self.attempts],
            "detail": job_to_dict(self.job) if self.job else None,
            "unreadable": self.unreadable or None,
        }


def _without_unreadable(data: dict[str, Any]) -> dict[str, Any]:
    """A record's fields, ``unreadable`` only when something is."""
    return {key: value for key, value in data.items() if key != "unreadable" or value}


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat() + "Z"
