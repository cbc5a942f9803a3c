"""When to try a failed step again, and when to stop: exponential backoff with jitter (pure); when
to pause a sink that keeps failing (:class:`BreakerPolicy`, applied by :mod:`webhook.ledger.breakers`)."""

from __future__ import annotations

import random
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveFloat, PositiveInt


class RetryPolicy(BaseModel):
    """How often and how patiently a failing step is retried (also a sink's ``retry`` table)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: PositiveInt = 8
    backoff_base: PositiveFloat = 2.0
    backoff_cap: PositiveFloat = 600.0
    max_age: PositiveFloat | None = None  # seconds after the callback arrived; past it, no more retries


class BreakerPolicy(BaseModel):
    """When a failing sink is paused, and for how long (also a sink's ``breaker`` table)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    failures: NonNegativeInt = 5  # failed deliveries in a row that pause the sink; 0: never paused
    pause: PositiveFloat = 30.0  # seconds paused before one delivery probes the sink


def backoff_delay(
    attempt: int,
    policy: RetryPolicy,
    retry_after: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    "Equal jitter": half of the exponential step is fixed, half random, so retries of many
    jobs that failed together spread out but none is retried immediately. A ``Retry-After``
    from the remote side is honoured, up to the policy's cap.
    """
    step = min(policy.backoff_cap, policy.backoff_base * 2.0 ** max(attempt - 1, 0))
    delay = step / 2 + rand() * step / 2
    if retry_after is not None:
        delay = max(delay, min(retry_after, policy.backoff_cap))
    return delay


def exhausted(attempts: int, policy: RetryPolicy) -> bool:
    """True once ``attempts`` tries have used up the policy's budget."""
    return attempts >= policy.max_attempts


def why_over(attempts: int, policy: RetryPolicy, age: float, final: str | None = None) -> str | None:
    """Why retrying a failed task is over, or None while it is not.

    ``final`` says why retrying cannot help at all (e.g. "refused permanently"); else the task is
    over once older than ``max_age`` (``age``: seconds since the callback arrived) or out of attempts.
    """
    if final is not None:
        return final
    if policy.max_age is not None and age > policy.max_age:
        return f"gave up: older than max_age {policy.max_age:g}s"
    if exhausted(attempts, policy):
        return f"ran out of {attempts} attempts"
    return None
