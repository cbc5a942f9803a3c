"""Hold the sandbox's jobs where CI reports them Running, until the test lets them finish.

A job is Running from the moment a sandbox thread takes it until its output is written; holding it
just before the noise reduction makes that phase last exactly as long as a test needs, instead of
racing a job delay:

    with held_jobs(monkeypatch) as gate:
        job_id = submit(...)
        gate.wait_entered()   # CI reports the job Running, and keeps doing so
        ...
        gate.release()        # the job (and every later one) runs to its end
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest

from webhook.dev.sandbox import jobs
from webhook.dev.sandbox.audio import reduce_noise

WAIT = 60.0  # seconds: a generous bound on every wait, so that a failing test ends


class JobGate:
    """Blocks each job at its noise reduction until :meth:`release`; records when the first got there."""

    def __init__(self, reduce_noise: Callable[..., Any]) -> None:
        self._reduce_noise = reduce_noise
        self._entered = threading.Event()
        self._open = threading.Event()
        self._lock = threading.Lock()
        self.entered_at: datetime | None = None  # UTC, when the first job reached the gate

    def wait_entered(self, timeout: float = WAIT) -> None:
        """Wait until a job has reached the gate: it is Running and stays so until :meth:`release`."""
        if not self._entered.wait(timeout):
            raise AssertionError(f"no sandbox job reached its noise reduction within {timeout:g} s")

    def release(self) -> None:
        self._open.set()

    def hold(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self.entered_at is None:
                self.entered_at = datetime.now(UTC)
        self._entered.set()
        # Bounded, so that a sandbox closing after a failed test is not held up for long.
        self._open.wait(WAIT)
        return self._reduce_noise(*args, **kwargs)


@contextmanager
def held_jobs(monkeypatch: pytest.MonkeyPatch) -> Iterator[JobGate]:
    """Every sandbox job in this process waits at the gate until it is released (at the latest on exit)."""
    gate = JobGate(reduce_noise)
    monkeypatch.setattr(jobs, "reduce_noise", gate.hold)
    try:
        yield gate
    finally:
        gate.release()
