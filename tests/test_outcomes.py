"""What becomes of a failed attempt, and the one place an outcome is recorded: ledger row, metric, log line."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from test_ledger import job, record

from webhook.ledger import Ledger, Task, Trying, VerifyClaim, utcnow
from webhook.models import Outcome, Step, TaskKind
from webhook.retry import RetryPolicy
from webhook.telemetry import metrics
from webhook.worker.outcomes import Abandoned, GaveUp, Recorder, Rejected, RetryLater, after_failure

POLICY = RetryPolicy(max_attempts=3, backoff_base=2.0, backoff_cap=60.0)
TASK = Task(id=1, job_id="j1", kind=TaskKind.VERIFY, attempts=1)


def test_a_failure_within_the_budget_is_retried_after_a_backoff() -> None:
    fetching, delivering = Trying(Step.FETCH), Trying(Step.DELIVER, "http")

    failed = after_failure(TASK, utcnow(), "CI API unreachable", POLICY, delivering, also=[fetching], code="503")

    assert isinstance(failed, RetryLater)
    assert 1.0 <= failed.delay <= 2.0  # the first step's half to whole
    assert [(a.step, a.sink, a.outcome, a.error, a.code) for a in failed.attempts] == [
        (Step.FETCH, "", Outcome.RETRY, "CI API unreachable", "503"),
        (Step.DELIVER, "http", Outcome.RETRY, "CI API unreachable", "503"),
    ]


def test_retry_after_and_a_delay_kept_together_are_honoured() -> None:
    asked = after_failure(TASK, utcnow(), "429", POLICY, Trying(Step.VERIFY), retry_after=30)
    together = after_failure(TASK, utcnow(), "503", POLICY, Trying(Step.VERIFY), delay=7.5)

    assert isinstance(asked, RetryLater)
    assert asked.delay == 30
    assert isinstance(together, RetryLater)
    assert together.delay == 7.5


@pytest.mark.parametrize(
    ("task", "age", "final", "error"),
    [
        (Task(1, "j1", TaskKind.VERIFY, attempts=3), 0, None, "boom (ran out of 3 attempts)"),
        (TASK, 0, "refused permanently", "boom (refused permanently)"),
    ],
)
def test_a_failure_past_the_budget_or_final_gives_up(task: Task, age: float, final: str | None, error: str) -> None:
    failed = after_failure(task, utcnow() - timedelta(seconds=age), "boom", POLICY, Trying(Step.VERIFY), final=final)

    assert isinstance(failed, GaveUp)
    assert failed.error == error
    assert [a.outcome for a in failed.attempts] == [Outcome.DEAD]


def test_a_failure_while_the_shutdown_abandons_work_is_due_again_at_once() -> None:
    spent = Task(1, "j1", TaskKind.VERIFY, attempts=3)  # out of attempts: abandoning costs none of them

    failed = after_failure(spent, utcnow(), "timed out", POLICY, Trying(Step.VERIFY), abandoned="abandoned: x")

    assert isinstance(failed, Abandoned)
    assert failed.error == "timed out (abandoned: x)"
    assert [a.outcome for a in failed.attempts] == [Outcome.ABANDONED]


def counted(outcome: str) -> float:
    return metrics.VERIFICATIONS.labels(outcome)._value.get()


def test_an_outcome_is_recorded_once_in_the_ledger_the_metrics_and_the_log(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    record(ledger, job(1))
    claim = ledger.queue.claim("worker-a", 300)
    assert isinstance(claim, VerifyClaim)
    ledger.workers.beat("worker-a", "here", 1)
    before = counted("rejected")
    caplog.set_level(logging.INFO, logger="webhook.worker")
    reason = "CI reports another bucket"
    attempt = Trying(Step.VERIFY).ended(Outcome.REJECTED, reason)

    deliveries = Recorder(ledger, "worker-a", 300).record(
        Rejected(claim.task, (attempt,), reason, {}), claim.received_at
    )

    assert deliveries is None
    view = ledger.views.show_job(claim.task.job_id)
    assert (view.status, view.reason) == ("rejected", reason)
    assert [(a.step, a.outcome, a.error, a.worker_id) for a in view.attempts] == [
        ("verify", "rejected", reason, "worker-a")
    ]
    assert counted("rejected") == before + 1
    assert [(r.levelname, r.getMessage(), r.job_id) for r in caplog.records] == [
        ("WARNING", f"rejected: {reason}", claim.task.job_id)
    ]
