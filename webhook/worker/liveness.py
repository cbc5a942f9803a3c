"""A worker's signs of life: its heartbeat row, the leases of work in progress, and taking over
from workers that died. Both are services of the worker (:mod:`webhook.worker.services`).

A killed worker cannot release what it held. Its successor (or any other worker) sees its
heartbeat go stale, or its process gone from this host, and releases its leases at once instead
of waiting for them to run out.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from webhook.ledger import STALE_BEATS, Ledger, LedgerUnavailable

log = logging.getLogger("webhook.worker")

SHUTDOWN = "abandoned: worker shutting down"
HARD_STOP_GRACE = 3.0  # seconds after abandoning before a worker stuck outside any deadline exits


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Heartbeat:
    """A service: renews this worker's row every ``interval`` seconds, so a long step never looks
    like death, and takes over from dead workers on each beat; on stopping, the worker leaves.

    The first beat registers the worker: the claim loop makes it before its first claim.
    ``on_takeover`` is called after it and after every beat that took over from dead workers
    (e.g. to remove partial downloads of workers no longer alive).
    """

    name = "heartbeat"

    def __init__(self, ledger: Ledger, worker_id: str, interval: float, on_takeover: Callable[[], None]) -> None:
        self.ledger, self.worker_id, self.interval = ledger, worker_id, interval
        self.on_takeover = on_takeover
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.running = False  # registered: from the first beat until the worker leaves

    def beat(self) -> None:
        """One beat: renew the row, then release what dead workers held."""
        self.ledger.workers.beat(self.worker_id, self.host, self.pid)
        taken = self.ledger.workers.take_over(self.interval * STALE_BEATS, self.host, pid_alive)
        first, self.running = not self.running, True
        if taken.dead or taken.released:
            log.warning(
                "took over from dead workers %s: %d leased tasks are due again",
                ",".join(taken.dead) or "-",
                taken.released,
            )
        if first or taken.dead or taken.released:
            self.on_takeover()

    def run(self, stopping: threading.Event) -> None:
        try:
            while not stopping.wait(self.interval):
                try:
                    self.beat()
                except LedgerUnavailable as exc:  # the ledger is away: the next beat tries again
                    why = exc.kind
                    log.error("heartbeat of worker %s failed: ledger unavailable (%s)", self.worker_id, why)
        finally:
            self.leave()

    def leave(self) -> None:
        """The row goes, with any lease still held."""
        self.running = False
        try:
            released = self.ledger.workers.leave(self.worker_id)
        except LedgerUnavailable:
            return  # the leases run out instead
        if released:
            log.info("worker %s released %d leases on leaving", self.worker_id, released)


class Leases:
    """A service: the tasks this worker holds, their leases renewed together every third of a lease
    while long steps (a large download, a slow sink) run; a claim is kept for as long as it runs."""

    name = "lease renewal"

    def __init__(self, ledger: Ledger, worker_id: str, lease_seconds: float) -> None:
        self.ledger, self.worker_id, self.lease_seconds = ledger, worker_id, lease_seconds
        self._held: set[int] = set()
        self._lock = threading.Lock()

    @contextmanager
    def kept(self, task_ids: Sequence[int]) -> Iterator[None]:
        with self._lock:
            self._held.update(task_ids)
        try:
            yield
        finally:
            with self._lock:
                self._held.difference_update(task_ids)

    def run(self, stopping: threading.Event) -> None:
        # Every third of a lease: a claim made just after a renewal is still renewed in time.
        while not stopping.wait(self.lease_seconds / 3):
            with self._lock:
                held = sorted(self._held)
            if not held:
                continue
            try:
                self.ledger.queue.extend_lease(held, self.worker_id, self.lease_seconds)
            except LedgerUnavailable as exc:  # the ledger is away: the next renewal tries again
                why = exc.kind
                log.error("could not renew the leases of %d tasks: ledger unavailable (%s)", len(held), why)
