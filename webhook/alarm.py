"""Timed callbacks for the whole process from one thread, where ``threading.Timer`` starts one each.

Deadlines set and move their alarms several times per network exchange; a new OS thread for
each of those was a measurable part of a worker's CPU per job. :data:`ALARMS` runs every
callback at its due time from a single daemon thread, started on first use::

    alarm = ALARMS.set(time.monotonic() + 30, on_time)
    ...
    ALARMS.cancel(alarm)  # it will not fire (unless it is firing already)

Callbacks run one after another in that thread, so they must be quick and never block.

The thread lives as long as the process and is not one of a worker's services
(:mod:`webhook.worker.services`): web processes set deadlines too, and a deadline must never find
its alarms stopped, not even while a worker stops. A forked child starts its own on first use.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable

log = logging.getLogger(__name__)


class Alarm:
    """One callback set with :meth:`Alarms.set`: the handle for :meth:`Alarms.cancel`."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[], object]) -> None:
        # None once fired or cancelled: a cancelled alarm also lets go of what its callback holds.
        self.callback: Callable[[], object] | None = callback


class Alarms:
    """Callbacks due at ``time.monotonic()`` instants, run in due order by one daemon thread."""

    def __init__(self, name: str = "alarms") -> None:
        self.name = name  # of the thread
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, Alarm]] = []  # cancelled alarms too, until due or compacted
        self._order = itertools.count()  # equal due times run in the order set; Alarms are never compared
        self._live = 0  # alarms in the heap neither fired nor cancelled
        self._thread: threading.Thread | None = None
        _instances.add(self)

    def set(self, due: float, callback: Callable[[], object]) -> Alarm:
        """Run ``callback`` in the alarms' thread once ``time.monotonic()`` reaches ``due``."""
        alarm = Alarm(callback)
        with self._condition:
            heapq.heappush(self._heap, (due, next(self._order), alarm))
            self._live += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            elif self._heap[0][2] is alarm:
                self._condition.notify()  # the thread sleeps until a later alarm
        return alarm

    def cancel(self, alarm: Alarm) -> None:
        """Make sure ``alarm`` does not fire; nothing if it has fired, or is firing, already."""
        with self._condition:
            if alarm.callback is None:
                return
            alarm.callback = None
            self._live -= 1
            # A cancelled alarm stays in the heap until due. Once they are most of it, drop them
            # all: setting and cancelling far-off alarms for ever must not grow it for ever.
            if len(self._heap) > 2 * self._live:
                self._heap = [entry for entry in self._heap if entry[2].callback is not None]
                heapq.heapify(self._heap)

    def pending(self) -> int:
        """How many alarms are set, neither fired nor cancelled."""
        with self._condition:
            return self._live

    def _run(self) -> None:
        while True:
            callback = self._next()
            try:
                callback()
            except Exception:
                log.exception("alarm callback %r failed", callback)

    def _next(self) -> Callable[[], object]:
        """Wait for the earliest alarm to come due, and take its callback."""
        with self._condition:
            while True:
                if not self._heap:
                    self._condition.wait()
                    continue
                due, _, alarm = self._heap[0]
                callback = alarm.callback
                if callback is None:
                    heapq.heappop(self._heap)  # cancelled
                    continue
                delay = due - time.monotonic()
                if delay > 0:
                    self._condition.wait(delay)  # or until set() puts an earlier alarm first
                    continue
                heapq.heappop(self._heap)
                alarm.callback = None
                self._live -= 1
                return callback

    def _forget(self) -> None:
        """Drop every alarm and the thread: this is a child just forked, which has no such thread."""
        for _, _, alarm in self._heap:
            alarm.callback = None  # cancelling a handle the child inherited must change nothing
        self._heap = []
        self._live = 0
        self._condition = threading.Condition()  # the parent's thread may have held it
        self._thread = None


_instances: weakref.WeakSet[Alarms] = weakref.WeakSet()

ALARMS = Alarms()
"""The process's alarms, which deadlines use."""


def _after_fork() -> None:
    # The parent's alarms belong to the parent's threads, and would cut connections that the
    # parent still uses: the child starts afresh, with its own thread on first use.
    for alarms in list(_instances):
        alarms._forget()


os.register_at_fork(after_in_child=_after_fork)
