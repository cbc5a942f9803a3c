"""Waiting for a state instead of sleeping for it: a bounded poll, and a stop event the test paces."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

POLL = 0.02  # seconds between looks at the condition


def wait_for(condition: Callable[[], object], what: str, timeout: float = 20) -> None:
    """Until ``condition()`` is true; fails naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g}s waiting for {what}"
        time.sleep(POLL)


class Paced(threading.Event):
    """The stop event of a service whose loop waits on it once a pass (``while not stopping.wait(t)``):
    each wait lasts until the test calls :meth:`step`, whatever ``t`` is, so a test runs the
    service's passes one at a time, at once and in order, and knows when each has ended."""

    def __init__(self) -> None:
        super().__init__()
        self._turn = threading.Semaphore(0)
        self._waits = 0  # calls of wait(): the service's loop began that many passes' waits
        self._changed = threading.Condition()

    def wait(self, timeout: float | None = None) -> bool:
        with self._changed:
            self._waits += 1
            self._changed.notify_all()
        if self.is_set():
            return True
        self._turn.acquire(timeout=60)  # bounded: a test that forgot to step fails instead of hanging
        return self.is_set()

    def step(self, passes: int = 1, timeout: float = 20) -> None:
        """Let the service run ``passes`` more passes; returns once it is waiting again after them.

        Fails if the service does not come back to wait: it ended (or hangs) instead of looping.
        """
        with self._changed:
            self._changed.wait_for(lambda: self._waits > 0, timeout)  # in its first wait
            target = self._waits + passes
            for _ in range(passes):
                self._turn.release()
            came_back = self._changed.wait_for(lambda: self._waits >= target, timeout)
        assert came_back, f"the service did not come back to wait after {passes} more passes: it stopped looping"

    def stop(self) -> None:
        """Set the event and let the service's current wait return (true): its loop ends."""
        self.set()
        self._turn.release()
