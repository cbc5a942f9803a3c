"""A worker's signs of life and how it stops: its heartbeat row, the leases of work in progress,
taking over from workers that died, and a shutdown that gives work back instead of dropping it.

A killed worker cannot release what it held. Its successor (or any other worker) sees its
heartbeat go stale, or its process gone from this host, and releases its leases at once instead
of waiting for them to run out.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

from webhook.deadline import Deadline
from webhook.ledger import STALE_BEATS, Ledger, TakenOver

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
    """Renews this worker's row every ``interval`` seconds in a thread of its own, so a long step
    never looks like death, and on each beat takes over from dead workers (``on_takeover`` then
    gets their ids, e.g. to remove their partial downloads)."""

    def __init__(
        self, ledger: Ledger, worker_id: str, interval: float, on_takeover: Callable[[TakenOver], None]
    ) -> None:
        self.ledger, self.worker_id, self.interval = ledger, worker_id, interval
        self.on_takeover = on_takeover
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def beat(self) -> None:
        """One beat: renew the row, then release what dead workers held."""
        self.ledger.workers.beat(self.worker_id, self.host, self.pid)
        taken = self.ledger.workers.take_over(self.interval * STALE_BEATS, self.host, pid_alive)
        if taken.dead or taken.released:
            log.warning(
                "took over from dead workers %s: %d leased tasks are due again",
                ",".join(taken.dead) or "-",
                taken.released,
            )
            self.on_takeover(taken)

    def start(self) -> None:
        """Register and take over now (before the first claim), then keep beating in the background."""
        self.beat()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and leave: the row goes, with any lease still held."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if released := self.ledger.workers.leave(self.worker_id):
            log.info("worker %s released %d leases on leaving", self.worker_id, released)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:  # the ledger may be away; the next beat tries again
                log.exception("heartbeat of worker %s failed", self.worker_id)


class Leases:
    """The tasks this worker holds, their leases renewed together by one thread while long
    steps (a large download, a slow sink) run; a claim is registered for as long as it runs."""

    def __init__(self, ledger: Ledger, worker_id: str, lease_seconds: float) -> None:
        self.ledger, self.worker_id, self.lease_seconds = ledger, worker_id, lease_seconds
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @contextmanager
    def kept(self, task_ids: Sequence[int]) -> Iterator[None]:
        with self._lock:
            self._held.update(task_ids)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._held.difference_update(task_ids)

    def _run(self) -> None:
        # Every third of a lease: a claim made just after a renewal is still renewed in time.
        while not self._stop.wait(self.lease_seconds / 3):
            with self._lock:
                held = sorted(self._held)
            if not held:
                continue
            try:
                self.ledger.queue.extend_lease(held, self.worker_id, self.lease_seconds)
            except Exception:
                log.exception("could not renew the leases of %d tasks", len(held))

    def stop(self) -> None:
        self._stop.set()


class Shutdown:
    """Stopping in three steps: no new claims at once; what is in flight gets ``budget`` seconds;
    then every active deadline is expired (the work fails as abandoned and is released), and a
    worker still stuck after a short grace calls ``hard_stop`` (release everything, exit)."""

    def __init__(self, budget: float, hard_stop: Callable[[], None]) -> None:
        self.budget = budget
        self.hard_stop = hard_stop
        self.stopping = threading.Event()  # no new claims
        self.abandoning = threading.Event()  # in-flight work is cut off and released
        self.idle = threading.Event()  # no claim in hand
        self.idle.set()
        self._busy = 0
        self._count = threading.Lock()

    def begin(self, why: str) -> None:
        if self.stopping.is_set():
            return
        log.info("stopping (%s); in-flight work has %gs", why, self.budget)
        self.stopping.set()
        threading.Thread(target=self._watch, name="shutdown", daemon=True).start()

    def install_signal_handlers(self) -> None:
        """SIGTERM (a PaaS restart) and SIGINT begin the shutdown."""

        def handler(signum: int, _frame: FrameType | None) -> None:
            self.begin(f"signal {signal.Signals(signum).name}")

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Around one claim's work (several run at once): the shutdown waits for all, up to the budget."""
        with self._count:
            self._busy += 1
            self.idle.clear()
        try:
            yield
        finally:
            with self._count:
                self._busy -= 1
                if not self._busy:
                    self.idle.set()

    def _watch(self) -> None:
        if self.idle.wait(self.budget):
            return
        log.warning("in-flight work did not finish within %gs: abandoning it", self.budget)
        self.abandoning.set()
        Deadline.expire_all(SHUTDOWN)
        if not self.idle.wait(HARD_STOP_GRACE):
            self.hard_stop()
