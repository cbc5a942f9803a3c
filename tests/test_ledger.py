"""The ledger against SQLite and PostgreSQL: recording, leases, outcomes and replay."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from support.services import postgres_schema

import webhook.ledger.queue as queue_module
from webhook.ledger import (
    Claim,
    Delivery,
    DeliveryClaim,
    Ledger,
    LedgerError,
    RawRequest,
    Recorded,
    VerifyClaim,
    utcnow,
)
from webhook.ledger.schema import tasks
from webhook.models import Callback, Job, JobStatus, ObjectLocation
from webhook.triage import triage

TAGS = frozenset({"NoiseReduction"})
RAW = RawRequest(body=b"<Response/>", content_type="application/xml", headers={}, remote_addr="127.0.0.1")


def job(n: int, tag: str = "NoiseReduction", state: str = "Success") -> Job:
    return Job(
        job_id=f"j{n:032x}",
        tag=tag,
        state=state,
        input=ObjectLocation("b-1", "ap-guangzhou", "in.wav"),
        output=ObjectLocation("b-1", "ap-guangzhou", f"out/{n}.wav"),
    )


def record(ledger: Ledger, *jobs: Job, event: str = "TaskFinish") -> Recorded:
    callback = Callback(event_name=event, jobs=jobs, body_format="xml")
    return ledger.jobs.record(RAW, callback, triage(callback, TAGS))


def claim(ledger: Ledger, worker: str = "w1", lease: float = 60) -> Claim:
    got = ledger.queue.claim(worker, lease)
    assert got is not None
    return got


def deliveries(ledger: Ledger, worker: str = "w1") -> tuple[Delivery, ...]:
    got = claim(ledger, worker)
    assert isinstance(got, DeliveryClaim)
    return got.deliveries


def test_callback_is_recorded_with_a_verify_task(ledger: Ledger) -> None:
    recorded = record(ledger, job(1), job(2))
    assert recorded.job_ids == (job(1).job_id, job(2).job_id)
    assert recorded.duplicates == ()
    view = ledger.views.show_job(job(1).job_id).to_dict()
    assert view["status"] == "received"
    assert view["state"] == "Success"
    assert [v["status"] for v in view["verify"]] == ["pending"]
    assert view["detail"]["output"] == {"bucket": "b-1", "region": "ap-guangzhou", "key": "out/1.wav"}


def test_duplicate_is_recorded_once(ledger: Ledger) -> None:
    record(ledger, job(1))
    again = record(ledger, job(1), job(3))
    assert again.duplicates == (job(1).job_id,)
    assert again.job_ids == (job(3).job_id,)
    with ledger.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(tasks)).scalar_one() == 2


def test_other_tags_and_events_are_ignored_without_work(ledger: Ledger) -> None:
    record(ledger, job(1, tag="VoiceSeparate"))
    record(ledger, job(2), event="WorkflowFinish")
    first, second = ledger.views.show_job(job(1).job_id), ledger.views.show_job(job(2).job_id)
    assert (first.status, first.reason) == ("ignored", "tag VoiceSeparate is not in WEBHOOK_ALLOWED_TAGS")
    assert (second.status, second.reason) == ("ignored", "event WorkflowFinish is recorded, not forwarded")
    assert first.tasks == second.tasks == ()
    assert ledger.queue.claim("w1", 60) is None


def test_a_leased_task_is_not_claimed_twice(ledger: Ledger) -> None:
    record(ledger, job(1))
    first = claim(ledger, "w1")
    assert isinstance(first, VerifyClaim)
    assert first.tasks[0].attempts == 1
    assert ledger.queue.claim("w2", 60) is None


def test_an_expired_lease_makes_the_task_due_again(ledger: Ledger) -> None:
    record(ledger, job(1))
    stale = claim(ledger, "w1", lease=0.2)
    time.sleep(0.3)
    again = claim(ledger, "w2")
    assert again.tasks[0].id == stale.tasks[0].id
    assert again.tasks[0].attempts == 2
    # The worker that lost its lease cannot overwrite the new owner's outcome.
    assert not ledger.queue.reject(stale.tasks[0], "w1", "late")
    assert ledger.queue.accept(again.tasks[0], "w2", ["filesystem"])
    assert ledger.views.show_job(job(1).job_id).status == "verified"


def test_extend_lease_keeps_the_task(ledger: Ledger) -> None:
    record(ledger, job(1))
    held = claim(ledger, "w1", lease=0.5)
    time.sleep(0.3)
    assert ledger.queue.extend_lease([held.tasks[0].id], "w1", 60) == 1
    time.sleep(0.3)
    assert ledger.queue.claim("w2", 60) is None


def test_concurrent_claimers_never_share_a_task(ledger: Ledger) -> None:
    record(ledger, *(job(n) for n in range(40)))
    seen: list[int] = []
    lock = threading.Lock()

    def drain(name: str) -> None:
        while (got := ledger.queue.claim(name, 60)) is not None:
            with lock:
                seen.extend(t.id for t in got.tasks)

    threads = [threading.Thread(target=drain, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == sorted(set(seen))
    assert len(seen) == 40


def test_accept_creates_one_delivery_per_sink_claimed_together(ledger: Ledger) -> None:
    record(ledger, job(1))
    verify = claim(ledger)
    assert ledger.queue.accept(verify.tasks[0], "w1", ["filesystem", "http"])
    deliver = claim(ledger)
    assert isinstance(deliver, DeliveryClaim)
    assert [d.sink for d in deliver.deliveries] == ["filesystem", "http"]
    assert ledger.views.show_job(job(1).job_id).status == JobStatus.VERIFIED


def test_job_is_delivered_when_every_sink_is(ledger: Ledger) -> None:
    record(ledger, job(1))
    ledger.queue.accept(claim(ledger).tasks[0], "w1", ["filesystem", "http"])
    fs, http = deliveries(ledger)
    assert ledger.queue.complete(fs, "w1")
    assert ledger.queue.retry_later(http, "w1", "503 from sink", delay=0)
    assert ledger.views.show_job(job(1).job_id).status == "verified"
    retry = claim(ledger)
    assert isinstance(retry, DeliveryClaim)
    assert [d.sink for d in retry.deliveries] == ["http"]
    assert ledger.queue.complete(retry.tasks[0], "w1")
    view = ledger.views.show_job(job(1).job_id).to_dict()
    assert view["status"] == "delivered"
    assert [(d["sink"], d["status"], d["attempts"]) for d in view["deliveries"]] == [
        ("filesystem", "done", 1),
        ("http", "done", 2),
    ]


def test_retry_later_waits_for_its_delay(ledger: Ledger) -> None:
    record(ledger, job(1))
    task = claim(ledger).tasks[0]
    ledger.queue.retry_later(task, "w1", "CI API unreachable", delay=3600)
    assert ledger.queue.claim("w1", 60) is None
    view = ledger.views.show_job(job(1).job_id).to_dict()
    assert view["verify"][0]["last_error"] == "CI API unreachable"
    assert view["verify"][0]["next_attempt_at"] is not None


def test_rejected_job_gets_no_deliveries_and_cannot_be_replayed(ledger: Ledger) -> None:
    record(ledger, job(1))
    assert ledger.queue.reject(claim(ledger).tasks[0], "w1", "output differs")
    view = ledger.views.show_job(job(1).job_id)
    assert (view.status, view.reason) == ("rejected", "output differs")
    assert ledger.queue.claim("w1", 60) is None
    with pytest.raises(LedgerError, match="is rejected; only verified jobs can be replayed"):
        ledger.jobs.replay(job(1).job_id, ["filesystem"])


def test_dead_delivery_makes_the_job_dead_and_replay_revives_it(ledger: Ledger) -> None:
    record(ledger, job(1))
    ledger.queue.accept(claim(ledger).tasks[0], "w1", ["http"])
    assert ledger.queue.give_up(claim(ledger).tasks[0], "w1", "sink answered 410")
    assert ledger.views.show_job(job(1).job_id).status == "dead"
    assert ledger.jobs.replay(job(1).job_id, ["http"]) == ["http"]
    again = claim(ledger)
    assert again.tasks[0].attempts == 1
    assert ledger.queue.complete(again.tasks[0], "w1")
    assert ledger.views.show_job(job(1).job_id).status == "delivered"


def test_dead_verification_cannot_be_replayed(ledger: Ledger) -> None:
    record(ledger, job(1))
    assert ledger.queue.give_up(claim(ledger).tasks[0], "w1", "CI API unreachable")
    view = ledger.views.show_job(job(1).job_id)
    assert (view.status, view.reason) == ("dead", "verification gave up: CI API unreachable")
    with pytest.raises(LedgerError, match="was never verified"):
        ledger.jobs.replay(job(1).job_id, ["filesystem"])


def test_replay_to_a_new_sink_adds_a_delivery(ledger: Ledger) -> None:
    record(ledger, job(1))
    ledger.queue.accept(claim(ledger).tasks[0], "w1", ["filesystem"])
    ledger.queue.complete(claim(ledger).tasks[0], "w1")
    ledger.jobs.replay(job(1).job_id, ["http"])
    assert [d.sink for d in deliveries(ledger)] == ["http"]


def test_unknown_job(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="no job 'nope' in the ledger"):
        ledger.views.show_job("nope")


def test_counts(ledger: Ledger) -> None:
    record(ledger, job(1), job(2, tag="Other"))
    assert ledger.views.counts() == {"jobs_received": 1, "jobs_ignored": 1, "tasks_pending": 1}


def test_schema_creation_is_idempotent(database_url: str) -> None:
    first, second = Ledger(database_url), Ledger(database_url)
    errors: list[BaseException] = []

    def create(ledger: Ledger) -> None:
        try:
            ledger.create_schema()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(lg,)) for lg in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first.create_schema()
    assert errors == []
    first.dispose()
    second.dispose()


@pytest.fixture
def postgres_ledger() -> Iterator[Ledger]:
    # PostgreSQL only: SQLite serializes write transactions (BEGIN IMMEDIATE), so the
    # interleaving below cannot happen there.
    with postgres_schema() as url:
        ledger = Ledger(url)
        ledger.create_schema()
        yield ledger
        ledger.dispose()


def test_deliveries_finished_at_once_by_two_workers_settle_the_job(
    postgres_ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = postgres_ledger
    record(ledger, job(1))
    assert ledger.queue.accept(claim(ledger).tasks[0], "w1", ["filesystem", "http"])
    # Two workers hold one delivery each, as SKIP LOCKED gives when they poll at the same instant.
    with ledger.engine.begin() as conn:
        conn.execute(tasks.update().where(tasks.c.sink == "http").values(run_after=utcnow() + timedelta(hours=1)))
    first = deliveries(ledger, "A")
    with ledger.engine.begin() as conn:
        conn.execute(tasks.update().where(tasks.c.sink == "http").values(run_after=utcnow()))
    second = deliveries(ledger, "B")
    assert ([d.sink for d in first], [d.sink for d in second]) == (["filesystem"], ["http"])

    # Hold both transactions after each closed its own task and before either settles the job.
    both_closed = threading.Barrier(2, timeout=10)
    settle = queue_module.settle

    def settle_together(conn: Connection, job_id: str, now: datetime) -> None:
        both_closed.wait()
        settle(conn, job_id, now)

    monkeypatch.setattr(queue_module, "settle", settle_together)
    results: dict[str, bool] = {}
    threads = [
        threading.Thread(target=lambda w=w, c=c: results.__setitem__(w, ledger.queue.complete(c[0], w)))
        for w, c in (("A", first), ("B", second))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert results == {"A": True, "B": True}
    assert ledger.views.show_job(job(1).job_id).status == "delivered"
