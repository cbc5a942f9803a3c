"""The process's alarm thread: callbacks at their due times, in order, from one thread.

Each test uses its own :class:`Alarms`, so the deadlines of other tests cannot wake its thread.
Bounds on time are generous; what is asserted is the order of events and which ones happened.
"""

from __future__ import annotations

import threading
import time

import pytest

from webhook.alarm import Alarms

WAIT = 5.0  # far longer than any alarm here needs


def soon(seconds: float) -> float:
    return time.monotonic() + seconds


def test_alarms_fire_in_due_order_from_one_thread() -> None:
    alarms = Alarms("test alarms")
    fired: list[tuple[str, str]] = []
    done = threading.Event()
    # Set out of order; the last one due says when all have fired.
    for name, delay in [("b", 0.10), ("c", 0.15), ("a", 0.05)]:
        alarms.set(soon(delay), lambda name=name: fired.append((name, threading.current_thread().name)))
    alarms.set(soon(0.2), done.set)
    assert done.wait(WAIT)
    assert fired == [("a", "test alarms"), ("b", "test alarms"), ("c", "test alarms")]
    assert alarms.pending() == 0


def test_an_alarm_fires_no_earlier_than_due() -> None:
    alarms = Alarms()
    fired_at: list[float] = []
    done = threading.Event()
    due = soon(0.05)
    alarms.set(due, lambda: (fired_at.append(time.monotonic()), done.set()))
    assert done.wait(WAIT)
    assert fired_at[0] >= due  # Deadline._fire ignores an alarm before its due time


def test_a_cancelled_alarm_never_fires() -> None:
    alarms = Alarms()
    fired: list[str] = []
    done = threading.Event()
    cancelled = alarms.set(soon(0.05), lambda: fired.append("cancelled"))
    alarms.set(soon(0.1), done.set)
    alarms.cancel(cancelled)
    alarms.cancel(cancelled)  # twice: still one alarm pending
    assert alarms.pending() == 1
    assert done.wait(WAIT)  # fired after the cancelled one was due
    assert fired == []


def test_cancelling_an_alarm_that_fired_changes_nothing() -> None:
    alarms = Alarms()
    done = threading.Event()
    alarm = alarms.set(soon(0), done.set)
    assert done.wait(WAIT)
    alarms.cancel(alarm)
    assert alarms.pending() == 0
    again = threading.Event()
    alarms.set(soon(0), again.set)
    assert again.wait(WAIT)


def test_an_earlier_alarm_wakes_the_thread_sleeping_until_a_later_one() -> None:
    alarms = Alarms()
    started = threading.Event()
    alarms.set(soon(0), started.set)
    assert started.wait(WAIT)  # the thread is running
    alarms.set(soon(60), lambda: None)
    time.sleep(0.1)  # let it go to sleep until the alarm a minute away (no assertion rests on this)
    early = threading.Event()
    alarms.set(soon(0.05), early.set)
    assert early.wait(WAIT)


def test_a_raising_callback_does_not_stop_later_alarms(caplog: pytest.LogCaptureFixture) -> None:
    alarms = Alarms()
    done = threading.Event()

    def boom() -> None:
        raise ValueError("boom")

    alarms.set(soon(0), boom)
    alarms.set(soon(0.05), done.set)
    assert done.wait(WAIT)
    failures = [record for record in caplog.records if record.name == "webhook.alarm"]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert isinstance(failures[0].exc_info[1], ValueError)


def test_setting_and_cancelling_for_ever_keeps_memory_bounded() -> None:
    alarms = Alarms()
    kept = [alarms.set(soon(3600), lambda: None) for _ in range(10)]
    for _ in range(100_000):
        alarms.cancel(alarms.set(soon(3600), lambda: None))  # none of them comes due during the test
    assert alarms.pending() == len(kept)
    # Cancelled alarms still in the heap are at most as many as live ones (and one being added).
    assert len(alarms._heap) <= 2 * len(kept) + 1
    for alarm in kept:
        alarms.cancel(alarm)
    assert alarms.pending() == 0
    assert alarms._heap == []


def test_one_thread_however_many_alarms() -> None:
    alarms = Alarms()
    before = threading.active_count()
    done = threading.Event()
    count = 0

    def tick() -> None:
        nonlocal count
        count += 1
        if count == 200:
            done.set()

    for i in range(200):
        alarms.set(soon(i / 2000), tick)
    assert threading.active_count() <= before + 1
    assert done.wait(WAIT)
