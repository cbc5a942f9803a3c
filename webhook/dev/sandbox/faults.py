"""Fault injection: make the sandbox behave like a flaky COS or CI for chosen requests.

A :class:`Fault` says which requests it matches (``kind``, ``method``, ``path``), how often it
fires (the next ``times`` matches, each with probability ``rate`` drawn from its own RNG seeded
with ``seed``, so a run is reproducible) and what it does: wait ``delay`` seconds, answer
``status`` with a COS ``<Error>`` body (and ``Retry-After``), cut the body after some bytes with
a TCP reset (``reset``) or a clean close (``truncate``), or send a wrong CRC64 header
(``bad_crc``). The first active fault that matches and fires decides; the others are not
consulted. :meth:`Faults.clear` removes them all and cuts short any delay in progress.

Over HTTP (``/_sandbox/faults``, see :mod:`webhook.dev.sandbox.server`) a fault is the JSON object of
the same fields, e.g. ``{"kind": "object GET", "status": 503, "retry_after": 5, "times": 2}``.
"""

from __future__ import annotations

import fnmatch
import math
import random
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from werkzeug.http import HTTP_STATUS_CODES

# What a request is, as fault rules name it. "bucket HEAD" is HeadBucket (no key).
KINDS = (
    "object GET",
    "object HEAD",
    "object PUT",
    "object DELETE",
    "bucket HEAD",
    "CI describe",
    "CI list",
    "CI submit",
)


class FaultError(ValueError):
    """A fault that cannot be applied as written; the message names the field."""


@dataclass(frozen=True)
class Fault:
    """One rule: which requests it matches, how often it fires, and what it does to them.

    Unset matchers match anything. ``path`` is a glob over the URL-decoded path (``/out/*.wav``).
    ``reset`` and ``truncate`` keep that many body bytes (never the whole body) after headers that
    announce the full ``Content-Length``; a response without a body just loses its connection.
    """

    kind: str | None = None
    method: str | None = None
    path: str | None = None
    times: int | None = None  # the next N requests it fires on; None: every one until cleared
    rate: float = 1.0  # chance of firing on each matching request
    seed: int = 0
    status: int | None = None
    code: str = ""  # the <Error><Code>; default: the status's reason phrase, e.g. ServiceUnavailable
    retry_after: int | None = None  # seconds, sent as Retry-After with ``status``
    delay: float = 0.0  # seconds to wait before answering
    reset: int | None = None
    truncate: int | None = None
    bad_crc: bool = False

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise FaultError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.times is not None and self.times < 1:
            raise FaultError("times must be at least 1 (or null for every request)")
        if not 0.0 <= self.rate <= 1.0:
            raise FaultError("rate must be between 0 and 1")
        if self.status is not None and not 400 <= self.status <= 599:
            raise FaultError("status must be an error status, 400 to 599")
        if self.retry_after is not None and (self.status is None or self.retry_after < 0):
            raise FaultError("retry_after needs a status and must not be negative")
        if not (math.isfinite(self.delay) and self.delay >= 0):
            raise FaultError("delay must be a number of seconds, not negative")
        if self.reset is not None and self.truncate is not None:
            raise FaultError("reset and truncate exclude each other")
        if min(self.reset or 0, self.truncate or 0) < 0:
            raise FaultError("reset and truncate count bytes and must not be negative")
        if not (self.status or self.delay or self.bad_crc or self.reset is not None or self.truncate is not None):
            raise FaultError("a fault needs an effect: status, delay, reset, truncate or bad_crc")

    @classmethod
    def from_dict(cls, data: object) -> Fault:
        """A fault from its JSON form (the field names above); raise :class:`FaultError` if unusable."""
        if not isinstance(data, dict):
            raise FaultError("a fault is a JSON object")
        unknown = sorted(set(data) - set(_JSON_TYPES))
        if unknown:
            raise FaultError(f"unknown fault fields: {', '.join(unknown)}")
        for name, value in data.items():
            # bool is an int in Python: reject true where a number is meant, and numbers for bad_crc.
            expected = _JSON_TYPES[name]
            if value is not None and (not isinstance(value, expected) or isinstance(value, bool) != (bool in expected)):
                raise FaultError(f"{name} has the wrong type: {value!r}")
        return cls(**data)

    def error_code(self) -> str:
        return self.code or HTTP_STATUS_CODES.get(self.status or 500, "Error").replace(" ", "")


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,),
    "method": (str,),
    "path": (str,),
    "times": (int,),
    "rate": (int, float),
    "seed": (int,),
    "status": (int,),
    "code": (str,),
    "retry_after": (int,),
    "delay": (int, float),
    "reset": (int,),
    "truncate": (int,),
    "bad_crc": (bool,),
}


@dataclass
class ActiveFault:
    """A fault in effect; ``fired`` counts the requests it has hit so far."""

    fault: Fault
    fired: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self.fault) | {"fired": self.fired}


class Faults:
    """The sandbox's fault rules; thread-safe, shared by every request thread."""

    def __init__(self) -> None:
        self._active: list[ActiveFault] = []
        self._lock = threading.Lock()
        # Bumped by clear(): a delay in progress watches it and ends early.
        self._generation = 0
        self._changed = threading.Condition(self._lock)

    def add(self, fault: Fault) -> ActiveFault:
        """Put ``fault`` into effect after those already active."""
        active = ActiveFault(fault, rng=random.Random(fault.seed))
        with self._lock:
            self._active.append(active)
        return active

    def clear(self) -> None:
        """Remove every fault; requests being delayed are answered now."""
        with self._changed:
            self._active = []
            self._generation += 1
            self._changed.notify_all()

    @property
    def active(self) -> list[ActiveFault]:
        """The faults in effect, in the order they are consulted."""
        with self._lock:
            return list(self._active)

    def pick(self, kind: str, method: str, path: str) -> Fault | None:
        """The fault to apply to this request, if any; counts it as fired."""
        with self._lock:
            for active in self._active:
                fault = active.fault
                if (
                    (fault.kind is None or fault.kind == kind)
                    and (fault.method is None or fault.method.upper() == method)
                    and (fault.path is None or fnmatch.fnmatchcase(path, fault.path))
                    and (fault.rate >= 1.0 or active.rng.random() < fault.rate)
                ):
                    active.fired += 1
                    if fault.times is not None and active.fired >= fault.times:
                        self._active.remove(active)
                    return fault
        return None

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less if :meth:`clear` is called meanwhile."""
        with self._changed:
            generation = self._generation
            self._changed.wait_for(lambda: self._generation != generation, seconds)
