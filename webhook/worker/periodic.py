"""Work one worker at a time does now and then (reconcile, prune), under a named ledger lock.

Each is a service of the worker (:mod:`webhook.worker.services`), in a thread of its own, so a
slow run (CI listing many pages) never holds up claiming. The service calls :meth:`Periodic.tick`
at once and then every interval; until the interval has passed since this process last ran (or
tried), a tick is a comparison of ``clock()`` and nothing else. When due, whoever wins the ledger
lock runs; the lock is held for one interval and not released, so however many workers tick, one
run happens per interval: the others find it held, and the winner's next tick takes it again. If
the winner stops, another takes over once its lock runs out.

Failures (a remote refusing, the ledger away) are one WARNING line and are tried again an
interval later; they never stop the service.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import timedelta
from typing import Generic, TypeVar

from webhook.ledger import Ledger, LedgerUnavailable, Pruned, utcnow
from webhook.telemetry.logs import escape

Result = TypeVar("Result")


class Periodic(ABC, Generic[Result]):
    """A service that runs :meth:`work` every ``interval`` seconds under the ledger lock ``lock``,
    one holder at a time; the service is named after the lock."""

    lock: str  # the ledger lock's name, and what the log lines call this work

    def __init__(
        self, ledger: Ledger, holder: str, interval: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ledger = ledger
        self.holder = holder
        self.interval = interval
        self._clock = clock
        self._next: float | None = None  # clock() at which the next run is due; None: the first tick
        self._ticking = False
        self.runs = 0  # runs that completed
        self.failures = 0  # runs (or lock attempts) that failed
        self.last: Result | None = None  # what the last completed run returned
        self.log = logging.getLogger(type(self).__module__)  # the module that says what the work is

    @property
    def name(self) -> str:
        return self.lock

    def due(self) -> bool:
        return self._next is None or self._clock() >= self._next

    def caught_up(self) -> bool:
        """Neither due nor running now (a burst waits for that before it ends)."""
        # In this order: a tick marks itself running before it moves the next run on.
        return not self.due() and not self._ticking

    def run(self, stopping: threading.Event) -> None:
        while True:
            self.tick()
            assert self._next is not None  # a tick sets it
            if stopping.wait(max(self._next - self._clock(), 0.0)):
                return

    def tick(self) -> Result | None:
        """Work if due and this holder wins the lock; what the work returned, else None."""
        if not self.due():
            return None
        self._ticking = True
        try:
            self._next = self._clock() + self.interval
            if not self.ledger.locks.acquire(self.lock, self.holder, self.interval):
                return None
            result = self.work()
        except Exception as exc:  # the service goes on: the next interval tries again
            self.failures += 1
            self.log.warning("%s failed, next try in %gs: %s", self.lock, self.interval, escape(self.reason(exc))[:500])
            return None
        finally:
            self._ticking = False
        self.runs += 1
        self.last = result
        return result

    @abstractmethod
    def work(self) -> Result:
        """One run, with its own log line."""

    def reason(self, exc: Exception) -> str:
        """A failure on one line, without secrets."""
        if isinstance(exc, LedgerUnavailable):
            return str(exc)
        return f"{type(exc).__name__}: {exc}"


class PeriodicPrune(Periodic[Pruned]):
    """Prunes finished jobs older than ``retention_days`` every ``interval`` seconds (one worker at a time)."""

    lock = "prune"

    def __init__(
        self,
        ledger: Ledger,
        holder: str,
        retention_days: float,
        interval: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(ledger, holder, interval, clock)
        self.retention_days = retention_days

    def work(self) -> Pruned:
        pruned = self.ledger.retention.prune(utcnow() - timedelta(days=self.retention_days))
        if pruned.jobs or pruned.callbacks:
            self.log.info("pruned %s finished over %g days ago", pruned.line(), self.retention_days)
        return pruned
