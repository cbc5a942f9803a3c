"""The decisions behind bulkheads and breakers, without servers: a worker's slots per lane, and
each sink's breaker moving between closed, open and probing."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from webhook.ledger import Delivery, DeliveryClaim, Room, Task, VerifyClaim
from webhook.ledger.breakers import Breaker, State
from webhook.models import TaskKind
from webhook.worker.lanes import VERIFY, Lanes

NOW = datetime(2026, 1, 1, 12, 0, 0)
LIMIT, PAUSE = 3, 30.0


def verify_claim(n: int = 1) -> VerifyClaim:
    return VerifyClaim(Task(n, f"j{n}", TaskKind.VERIFY, 1), (), NOW)


def delivery_claim(*sinks: str, n: int = 1) -> DeliveryClaim:
    deliveries = tuple(Delivery(10 * n + i, f"j{n}", TaskKind.DELIVER, 1, sink) for i, sink in enumerate(sinks))
    return DeliveryClaim("{}", deliveries, NOW)


# -- slots ---------------------------------------------------------------------------------------


def free(lanes: Lanes) -> Room:
    """The free slots, read by reserving them all and claiming nothing."""
    room = lanes.reserve()
    lanes.claimed(room, [])
    return room


def test_each_lane_has_its_own_slots_and_the_pool_a_thread_for_each() -> None:
    lanes = Lanes(4, {"filesystem": 2, "http": 2})
    assert lanes.capacity == 8
    assert free(lanes) == Room(4, {"filesystem": 2, "http": 2})


def test_a_sink_whose_slots_are_taken_leaves_the_other_lanes_their_room() -> None:
    lanes = Lanes(4, {"filesystem": 2, "http": 2})
    stuck = [lanes.hold(delivery_claim("http", n=n)) for n in (1, 2)]
    assert free(lanes) == Room(4, {"filesystem": 2, "http": 0})
    lanes.hold(verify_claim())
    lanes.hold(delivery_claim("filesystem"))
    assert free(lanes) == Room(3, {"filesystem": 1, "http": 0})
    stuck[0].release_all()
    assert free(lanes).sinks["http"] == 1


def test_a_slot_is_given_back_as_its_task_ends_and_only_once() -> None:
    released: list[None] = []
    lanes = Lanes(2, {"filesystem": 1, "http": 1}, on_release=lambda: released.append(None))
    held = lanes.hold(delivery_claim("filesystem", "http"))
    assert free(lanes) == Room(2, {"filesystem": 0, "http": 0})
    held.release("filesystem")
    held.release("filesystem")  # already given back: nothing more
    assert free(lanes) == Room(2, {"filesystem": 1, "http": 0})
    held.release_all()
    held.release_all()
    assert free(lanes) == Room(2, {"filesystem": 1, "http": 1})
    assert len(released) == 2  # the claim loop is woken for each freed slot


def test_a_verification_goes_on_only_to_the_sinks_with_a_free_slot() -> None:
    lanes = Lanes(2, {"filesystem": 1, "http": 1})
    lanes.hold(delivery_claim("http", n=9))  # http's one slot hangs
    held = lanes.hold(verify_claim())
    assert held.take(["filesystem", "http"]) == ("filesystem",)
    held.release(VERIFY)  # the verification's outcome is recorded: its slot is free while it delivers
    assert free(lanes) == Room(2, {"filesystem": 0, "http": 0})
    held.release_all()
    assert free(lanes) == Room(2, {"filesystem": 1, "http": 0})


def test_a_reservation_keeps_the_slots_for_the_claim_and_gives_back_what_it_did_not_lease() -> None:
    released: list[None] = []
    lanes = Lanes(2, {"filesystem": 2, "http": 1}, on_release=lambda: released.append(None))
    verifying = lanes.hold(verify_claim(n=7))
    room = lanes.reserve()
    assert room == Room(1, {"filesystem": 2, "http": 1})
    assert verifying.take(["filesystem", "http"]) == ()  # reserved for the claim under way
    held = lanes.claimed(room, [delivery_claim("http"), verify_claim()])
    assert len(held) == 2
    assert free(lanes) == Room(0, {"filesystem": 2, "http": 0})
    assert released == []  # slots never used free nothing: the claim loop is not woken for them
    assert verifying.take(["filesystem", "http"]) == ("filesystem",)


def test_a_claim_for_a_sink_this_worker_lacks_is_counted_and_given_back() -> None:
    lanes = Lanes(1, {"filesystem": 1})
    held = lanes.hold(delivery_claim("gone"))
    assert free(lanes) == Room(1, {"filesystem": 1})
    held.release_all()
    assert free(lanes) == Room(1, {"filesystem": 1})


# -- breakers ------------------------------------------------------------------------------------


def failed(breaker: Breaker, times: int, now: datetime = NOW) -> Breaker:
    for _ in range(times):
        breaker = breaker.after(False, LIMIT, PAUSE, now)
    return breaker


def test_a_closed_breaker_admits_as_many_as_there_are_slots() -> None:
    assert Breaker("http").admits(NOW) is None
    assert not Breaker("http").troubled


def test_failures_in_a_row_open_the_breaker_for_the_pause() -> None:
    almost = failed(Breaker("http"), LIMIT - 1)
    assert (almost.state, almost.failures, almost.admits(NOW)) == (State.CLOSED, LIMIT - 1, None)
    assert almost.troubled  # a success must reset the count
    opened = failed(almost, 1)
    assert (opened.state, opened.until) == (State.OPEN, NOW + timedelta(seconds=PAUSE))
    assert opened.admits(NOW + timedelta(seconds=PAUSE - 1)) == 0


def test_a_success_resets_the_count() -> None:
    breaker = failed(Breaker("http"), LIMIT - 1).after(True, LIMIT, PAUSE, NOW)
    assert breaker == Breaker("http")
    assert failed(breaker, LIMIT - 1).state == State.CLOSED


def test_a_limit_of_zero_never_opens() -> None:
    breaker = Breaker("http")
    for _ in range(100):
        breaker = breaker.after(False, 0, PAUSE, NOW)
    assert (breaker.state, breaker.failures) == (State.CLOSED, 100)


def test_failures_while_open_do_not_extend_the_pause() -> None:
    opened = failed(Breaker("http"), LIMIT)
    later = failed(opened, 2, NOW + timedelta(seconds=10))
    assert (later.state, later.until, later.failures) == (State.OPEN, opened.until, LIMIT + 2)


def test_after_the_pause_one_probe_then_its_outcome_decides() -> None:
    opened = failed(Breaker("http"), LIMIT)
    after_pause = NOW + timedelta(seconds=PAUSE)
    assert opened.admits(after_pause) == 1
    probing = Breaker("http", State.PROBING, opened.failures, after_pause + timedelta(seconds=60))
    assert probing.admits(after_pause) == 0  # one probe at a time
    assert probing.admits(after_pause + timedelta(seconds=61)) == 1  # its lease ran out: another
    assert probing.after(True, LIMIT, PAUSE, after_pause) == Breaker("http")
    reopened = probing.after(False, LIMIT, PAUSE, after_pause)
    assert (reopened.state, reopened.until) == (State.OPEN, after_pause + timedelta(seconds=PAUSE))


@pytest.mark.parametrize("state", [State.OPEN, State.PROBING])
def test_a_success_closes_from_any_state(state: State) -> None:
    assert Breaker("http", state, 7, NOW).after(True, LIMIT, PAUSE, NOW) == Breaker("http")
