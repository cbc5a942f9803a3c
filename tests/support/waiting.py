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
    service's passes one at a time, at once and in order, and knows when each has ended.

    :meth:`run` starts the service in a thread; a service that ends instead of looping fails the step.
    """

    def __init__(self) -> None:
        super().__init__()
        self._turn = threading.Semaphore(0)
        self._waits = 0  # calls of wait(): the service's loop began that many passes' waits
        self._changed = threading.Condition()
        self.thread: threading.Thread | None = None

    def run(self, name: str, body: Callable[[threading.Event], None]) -> threading.Thread:
        """``body(self)`` in a thread of its own, as the service's runner would start it."""
        self.thread = threading.Thread(target=body, args=(self,), name=name, daemon=True)
        self.thread.start()
        return self.thread

    def wait(self, timeout: float | None = None) -> bool:
        with self._changed:
            self._waits += 1
            self._changed.notify_all()
        if self.is_set():
            return True
        self._turn.acquire(timeout=60)  # bounded: a test that forgot to step fails instead of hanging
        return self.is_set()

    def step(self, passes: int = 1, timeout: float = 20) -> None:
        """Let the service run ``passes`` more passes; returns once it is waiting again after them."""
        deadline = time.monotonic() + timeout
        with self._changed:
            target = max(self._waits, 1) + passes  # counted from its first wait, should it not be in it yet
            for _ in range(passes):
                self._turn.release()
            while self._waits < target:
                ended = self.thread is not None and not self.thread.is_alive()
                assert not ended, f"the service ended instead of coming back to wait after {passes} more passes"
                assert time.monotonic() < deadline, f"the service did not come back to wait within {timeout:g}s"
                self._changed.wait(POLL)

    def stop(self) -> None:
        """Set the event and let the service's current wait return (true): its loop ends."""
        self.set()
        self._turn.release()
