"""A worker's bulkheads: slots per lane, so a slow or hanging sink holds only its own.

Verification has ``WEBHOOK_WORKER_CONCURRENCY`` slots and each sink its ``concurrency`` (default
``WEBHOOK_SINK_CONCURRENCY``, else half the worker's). The claim loop asks the ledger only for
work its lanes have room for (:class:`~webhook.ledger.Room`, reserved while it claims); each claim holds a slot per task
(:class:`Held`) and gives each back as soon as that task's outcome is recorded, so a verification
that goes on to deliver holds verification's slot no longer than the verification itself. The
thread pool has a thread for every slot.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

from webhook.ledger import Claim, Room, VerifyClaim

VERIFY = ""  # verification's lane (a sink's name is never empty)


class Lanes:
    """Each lane's slots and how many are held; shared by the claim loop and the claims' threads."""

    def __init__(self, verify: int, sinks: Mapping[str, int], on_release: Callable[[], None] = lambda: None) -> None:
        self.sizes = {VERIFY: verify, **sinks}
        self._used: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._on_release = on_release

    @property
    def capacity(self) -> int:
        """Slots in all: the threads a worker needs."""
        return sum(self.sizes.values())

    def reserve(self) -> Room:
        """Every free slot, reserved for a claim about to be made: the claims' threads cannot take
        them meanwhile (a verification going on to its deliveries), so the claim cannot overfill a lane.
        :meth:`claimed` settles the reservation."""
        with self._lock:
            free = {lane: max(0, size - self._used[lane]) for lane, size in self.sizes.items()}
            self._used.update(free)
        return Room(free.pop(VERIFY), free)

    def claimed(self, reserved: Room, claims: Sequence[Claim]) -> list[Held]:
        """The slots of each of ``claims``, out of the ``reserved`` room; what they left is free again.

        A claim may take a slot beyond its lane's size: an unreadable row, or a sink this worker
        lacks, is leased whatever the room, and ends at once.
        """
        left = Counter({VERIFY: reserved.verify, **reserved.sinks})
        held = []
        with self._lock:
            for claim in claims:
                lanes = [VERIFY] if isinstance(claim, VerifyClaim) else [d.sink for d in claim.deliveries]
                for lane in lanes:
                    if left[lane] > 0:
                        left[lane] -= 1
                    else:
                        self._used[lane] += 1
                held.append(Held(self, lanes))
            self._used.subtract(left)  # never claimed: free again, without waking anyone
        return held

    def hold(self, claim: Claim) -> Held:
        """The slots of a claim made without a reservation (taken whatever is free)."""
        return self.claimed(Room(0, {}), [claim])[0]

    def _take_free(self, lanes: Iterable[str]) -> list[str]:
        with self._lock:
            taken = [lane for lane in lanes if self._used[lane] < self.sizes.get(lane, 0)]
            self._used.update(taken)
        return taken

    def _give_back(self, lane: str) -> None:
        with self._lock:
            self._used[lane] -= 1
        self._on_release()


class Held:
    """The slots one claim holds: each given back once its task's outcome is recorded, any left when
    the claim ends."""

    def __init__(self, lanes: Lanes, held: list[str]) -> None:
        self._lanes = lanes
        self._held = Counter(held)
        self._lock = threading.Lock()

    def take(self, sinks: Iterable[str]) -> tuple[str, ...]:
        """Those of ``sinks`` with a free slot, now held too (a verification going on to its deliveries)."""
        taken = self._lanes._take_free(sinks)
        with self._lock:
            self._held.update(taken)
        return tuple(taken)

    def release(self, lane: str) -> None:
        """Give back one slot of ``lane``, if this claim holds one."""
        with self._lock:
            if self._held[lane] <= 0:
                return
            self._held[lane] -= 1
        self._lanes._give_back(lane)

    def release_all(self) -> None:
        with self._lock:
            left = list(self._held.elements())
            self._held.clear()
        for lane in left:
            self._lanes._give_back(lane)
