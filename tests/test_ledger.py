"""The ledger against SQLite and PostgreSQL: recording, leases, outcomes and replay."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from support.samples import numbered_job as job
from support.services import POSTGRES_URL, postgres_schema
from support.waiting import wait_for

import webhook.ledger.queue as queue_module
from webhook.intake.triage import triage
from webhook.ledger import (
    Claim,
    Delivery,
    DeliveryClaim,
    Ledger,
    LedgerError,
    LedgerUnavailable,
    RawRequest,
    Recorded,
    Replayed,
    UnknownJob,
    VerifyClaim,
    utcnow,
)
from webhook.ledger.schema import tasks
from webhook.ledger.wakeup import listen
from webhook.models import Callback, Job, JobStatus, job_from_json, job_to_dict

TAGS = frozenset({"NoiseReduction"})
RAW = RawRequest(body=b"<Response/>", content_type="application/xml", headers={}, remote_addr="127.0.0.1")


def job_json(n: int) -> str:
    return json.dumps(job_to_dict(job(n)))


def record(ledger: Ledger, *jobs: Job, event: str = "TaskFinish") -> Recorded:
    callback = Callback(event_name=event, jobs=jobs, body_format="xml")
    return ledger.jobs.record(RAW, callback, triage(callback, TAGS))


def claim(ledger: Ledger, worker: str = "w1", lease: float = 60) -> Claim:
    got = ledger.queue.claim(worker, lease)
    assert got is not None
    return got


def claim_when_due(ledger: Ledger, worker: str) -> Claim:
    """The next claim, made as soon as a task is due (e.g. once another worker's lease ran out)."""
    claims: list[Claim | None] = []

    def due() -> bool:
        claims.append(ledger.queue.claim(worker, 60))
        return claims[-1] is not None

    wait_for(due, "a task to be due")
    got = claims[-1]
    assert got is not None
    return got


def accept(ledger: Ledger, got: Claim, sinks: list[str], worker: str = "w1", lease: float = 60) -> DeliveryClaim | None:
    """Verification passed for the claim's first version, as the worker records it: the job's new
    deliveries come back leased to it (None if it lost its lease)."""
    assert isinstance(got, VerifyClaim)
    version = got.versions[0]
    return ledger.queue.accept_and_claim(got, worker, sinks, version, job_from_json(version.detail), {}, (), lease)


def reject(ledger: Ledger, got: Claim, reason: str, worker: str = "w1") -> bool:
    assert isinstance(got, VerifyClaim)
    return ledger.queue.reject(got.task, worker, reason, {v.id: reason for v in got.versions})


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
    record(ledger, job(2), event="TaskProgress")
    first, second = ledger.views.show_job(job(1).job_id), ledger.views.show_job(job(2).job_id)
    assert (first.status, first.reason) == ("ignored", "tag VoiceSeparate is not in WEBHOOK_ALLOWED_TAGS")
    assert (second.status, second.reason) == ("ignored", "event TaskProgress is recorded, not forwarded")
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
    again = claim_when_due(ledger, "w2")
    assert again.tasks[0].id == stale.tasks[0].id
    assert again.tasks[0].attempts == 2
    # The worker that lost its lease cannot overwrite the new owner's outcome.
    assert not reject(ledger, stale, "late", "w1")
    assert accept(ledger, again, ["filesystem"], "w2")
    assert ledger.views.show_job(job(1).job_id).status == "verified"


def test_extend_lease_keeps_the_task(ledger: Ledger) -> None:
    record(ledger, job(1))
    held = claim(ledger, "w1", lease=0.2)
    ran_out = utcnow() + timedelta(seconds=0.2)
    assert ledger.queue.extend_lease([held.tasks[0].id], "w1", 60) == 1
    wait_for(lambda: utcnow() > ran_out, "the first lease to have run out")
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


def test_deliveries_another_worker_left_are_claimed_together(ledger: Ledger) -> None:
    record(ledger, job(1))
    assert accept(ledger, claim(ledger), ["filesystem", "http"])
    assert ledger.workers.leave("w1") == 2  # w1 stops: its leased deliveries are due again
    deliver = claim(ledger, "w2")
    assert isinstance(deliver, DeliveryClaim)
    assert [d.sink for d in deliver.deliveries] == ["filesystem", "http"]
    assert ledger.views.show_job(job(1).job_id).status == JobStatus.VERIFIED


def test_a_verifier_goes_on_to_the_deliveries_it_created(ledger: Ledger) -> None:
    record(ledger, job(1))
    verify = claim(ledger)
    assert isinstance(verify, VerifyClaim)
    got = accept(ledger, verify, ["http", "filesystem"])
    assert isinstance(got, DeliveryClaim)
    assert [(d.sink, d.attempts) for d in got.deliveries] == [("filesystem", 1), ("http", 1)]
    assert (got.detail, got.received_at, got.delivered_to) == (job_json(1), verify.received_at, frozenset())
    assert ledger.views.show_job(job(1).job_id).status == JobStatus.VERIFIED
    assert ledger.queue.claim("w2", 60) is None  # leased to w1 already
    for delivery in got.deliveries:
        assert ledger.queue.complete(delivery, "w1")
    assert ledger.views.show_job(job(1).job_id).status == JobStatus.DELIVERED


def test_deliveries_a_verifier_leased_are_due_again_when_its_lease_runs_out(ledger: Ledger) -> None:
    record(ledger, job(1))
    held = accept(ledger, claim(ledger), ["filesystem", "http"], lease=0.2)
    assert isinstance(held, DeliveryClaim)
    again = claim_when_due(ledger, "w2")
    assert isinstance(again, DeliveryClaim)
    assert [(d.id, d.attempts) for d in again.deliveries] == [(d.id, 2) for d in held.deliveries]
    assert not ledger.queue.complete(held.deliveries[0], "w1")  # no longer w1's


def test_a_verifier_that_lost_its_lease_leases_nothing(ledger: Ledger) -> None:
    record(ledger, job(1))
    stale = claim(ledger, "w1", lease=0.2)
    claim_when_due(ledger, "w2")
    assert accept(ledger, stale, ["filesystem"]) is None
    assert [t.kind for t in ledger.views.show_job(job(1).job_id).tasks] == ["verify"]
    assert ledger.views.show_job(job(1).job_id).status == JobStatus.RECEIVED


def test_one_claim_takes_due_work_of_several_jobs_oldest_first(ledger: Ledger) -> None:
    record(ledger, job(1), job(2), job(3))
    verifying = ledger.queue.claim_many("w1", 60, 10)
    assert [(type(c), c.tasks[0].job_id) for c in verifying] == [(VerifyClaim, job(n).job_id) for n in (1, 2, 3)]
    assert [[v.detail for v in c.versions] for c in verifying if isinstance(c, VerifyClaim)] == [
        [job_json(n)] for n in (1, 2, 3)
    ]
    assert accept(ledger, verifying[0], ["filesystem", "http"])
    assert accept(ledger, verifying[1], ["http"])
    assert accept(ledger, verifying[2], []) is None  # no sink takes it: nothing to deliver
    ledger.workers.leave("w1")  # the deliveries w1 went on to are due again, for others to claim
    first = ledger.queue.claim_many("w2", 60, 1)
    rest = ledger.queue.claim_many("w2", 60, 10)
    assert [[(d.job_id, d.sink) for d in c.tasks] for c in first + rest] == [
        [(job(1).job_id, "filesystem"), (job(1).job_id, "http")],
        [(job(2).job_id, "http")],
    ]
    assert ledger.queue.claim_many("w3", 60, 10) == []


def test_job_is_delivered_when_every_sink_is(ledger: Ledger) -> None:
    record(ledger, job(1))
    accepted = accept(ledger, claim(ledger), ["filesystem", "http"])
    assert accepted is not None
    fs, http = accepted.deliveries
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


def test_a_delivery_claim_says_which_of_the_job_s_deliveries_are_to_come_in_another(ledger: Ledger) -> None:
    # What the worker keeps a job's staged files for: a delivery not in its claim, still to be retried.
    record(ledger, job(1))
    accepted = accept(ledger, claim(ledger), ["amqp", "filesystem", "http"])
    assert accepted is not None
    assert accepted.pending_elsewhere == frozenset()
    amqp, fs, http = accepted.deliveries
    assert ledger.queue.complete(amqp, "w1")
    assert ledger.queue.retry_later(fs, "w1", "disk full", delay=0)
    assert ledger.queue.retry_later(http, "w1", "503 from sink", delay=3600)
    retry = claim(ledger)
    assert isinstance(retry, DeliveryClaim)
    assert [d.sink for d in retry.deliveries] == ["filesystem"]
    assert (retry.delivered_to, retry.pending_elsewhere) == (frozenset({"amqp"}), frozenset({"http"}))


def test_retry_later_waits_for_its_delay(ledger: Ledger) -> None:
    record(ledger, job(1))
    task = claim(ledger).tasks[0]
    ledger.queue.retry_later(task, "w1", "CI API unreachable", delay=3600)
    assert ledger.queue.claim("w1", 60) is None
    view = ledger.views.show_job(job(1).job_id).to_dict()
    assert view["verify"][0]["last_error"] == "CI API unreachable"
    assert view["verify"][0]["next_attempt_at"] is not None


def test_rejected_job_gets_no_deliveries_until_replayed_then_is_verified_again(ledger: Ledger) -> None:
    record(ledger, job(1))
    assert reject(ledger, claim(ledger), "output differs")
    view = ledger.views.show_job(job(1).job_id)
    assert (view.status, view.reason) == ("rejected", "output differs")
    assert [v.status for v in view.versions] == ["rejected"]
    assert ledger.queue.claim("w1", 60) is None
    assert ledger.jobs.replay(job(1).job_id, ["filesystem"]) == Replayed(job(1).job_id, verify=True, sinks=())
    again = claim(ledger)
    assert isinstance(again, VerifyClaim)
    assert (again.task.attempts, [v.detail for v in again.versions]) == (1, [job_json(1)])
    assert ledger.views.show_job(job(1).job_id).status == "received"


def test_dead_delivery_makes_the_job_dead_and_replay_revives_it(ledger: Ledger) -> None:
    record(ledger, job(1))
    accepted = accept(ledger, claim(ledger), ["http"])
    assert accepted is not None
    assert ledger.queue.give_up(accepted.deliveries[0], "w1", "sink answered 410")
    assert ledger.views.show_job(job(1).job_id).status == "dead"
    assert ledger.jobs.replay(job(1).job_id, ["http"]) == Replayed(job(1).job_id, verify=False, sinks=("http",))
    again = claim(ledger)
    assert again.tasks[0].attempts == 1
    assert ledger.queue.complete(again.tasks[0], "w1")
    assert ledger.views.show_job(job(1).job_id).status == "delivered"


def test_dead_verification_is_listed_and_replayed(ledger: Ledger) -> None:
    record(ledger, job(1))
    assert ledger.queue.give_up(claim(ledger).tasks[0], "w1", "CI API unreachable")
    view = ledger.views.show_job(job(1).job_id)
    assert (view.status, view.reason) == ("dead", "verification gave up: CI API unreachable")
    (letter,) = ledger.views.dead_letters()
    assert (letter.kind, letter.job_id, letter.sink, letter.last_error) == (
        "verify",
        job(1).job_id,
        None,
        "CI API unreachable",
    )
    assert ledger.views.dead_letters(sink="filesystem") == []
    assert ledger.jobs.replay(job(1).job_id, ["filesystem"]).verify
    assert ledger.views.dead_letters() == []
    assert accept(ledger, claim(ledger), ["filesystem"])
    assert ledger.views.show_job(job(1).job_id).status == "verified"


def test_a_waiting_job_has_nothing_to_replay(ledger: Ledger) -> None:
    record(ledger, job(1))
    with pytest.raises(LedgerError, match="is received: it is waiting for verification, nothing to replay"):
        ledger.jobs.replay(job(1).job_id, ["filesystem"])


def test_replay_to_a_new_sink_adds_a_delivery(ledger: Ledger) -> None:
    record(ledger, job(1))
    accepted = accept(ledger, claim(ledger), ["filesystem"])
    assert accepted is not None
    ledger.queue.complete(accepted.deliveries[0], "w1")
    ledger.jobs.replay(job(1).job_id, ["http"])
    assert [d.sink for d in deliveries(ledger)] == ["http"]


def test_unknown_job(ledger: Ledger) -> None:
    with pytest.raises(UnknownJob, match="no job 'nope' in the ledger"):
        ledger.views.show_job("nope")
    with pytest.raises(UnknownJob, match="no job 'nope' in the ledger"):
        ledger.jobs.replay("nope", ["filesystem"])


def test_what_the_database_raises_leaves_the_ledger_as_its_own_error(ledger: Ledger) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE job_versions"))  # a broken schema: every callback fails to commit
    with pytest.raises(LedgerUnavailable) as caught:
        record(ledger, job(1))
    failure = caught.value
    expected = "OperationalError" if ledger.engine.dialect.name == "sqlite" else "ProgrammingError"
    assert (str(failure), failure.kind) == (f"ledger unavailable ({expected})", expected)
    assert "job_versions" in failure.detail  # the driver's own message, first line only
    assert "INSERT" not in failure.detail  # never the statement
    assert failure.where == ledger.engine.url.render_as_string(hide_password=True)
    assert isinstance(failure.__cause__, sa.exc.SQLAlchemyError | psycopg.Error)
    with pytest.raises(LedgerUnavailable):
        ledger.views.raw_callbacks(job(1).job_id)  # reads, too


def test_counts(ledger: Ledger) -> None:
    record(ledger, job(1), job(2, tag="Other"))
    assert ledger.views.counts() == {"jobs_received": 1, "jobs_ignored": 1, "tasks_pending": 1}


def test_schema_creation_is_idempotent(database_url: str) -> None:
    first, second = Ledger(database_url), Ledger(database_url)
    errors: list[BaseException] = []

    def create(ledger: Ledger) -> None:
        try:
            ledger.migrate()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(lg,)) for lg in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first.migrate()
    assert errors == []
    first.dispose()
    second.dispose()


@pytest.fixture
def postgres_ledger() -> Iterator[Ledger]:
    # PostgreSQL only: SQLite serializes write transactions (BEGIN IMMEDIATE), so the
    # interleaving below cannot happen there.
    with postgres_schema() as url:
        ledger = Ledger(url)
        ledger.migrate()
        yield ledger
        ledger.dispose()


def test_deliveries_finished_at_once_by_two_workers_settle_the_job(
    postgres_ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = postgres_ledger
    record(ledger, job(1))
    assert accept(ledger, claim(ledger), ["filesystem", "http"])
    ledger.workers.leave("w1")  # its deliveries are due again, for the two workers below
    # Two workers hold one delivery each, as SKIP LOCKED gives when they poll at the same instant.
    with ledger.engine.begin() as conn:
        conn.execute(tasks.update().where(tasks.c.sink == "http").values(run_after=utcnow() + timedelta(hours=1)))
    first = deliveries(ledger, "A")
    with ledger.engine.begin() as conn:
        conn.execute(tasks.update().where(tasks.c.sink == "http").values(run_after=utcnow()))
    second = deliveries(ledger, "B")
    assert ([d.sink for d in first], [d.sink for d in second]) == (["filesystem"], ["http"])

    # The first to settle holds its transaction open until the other is seen waiting for the job
    # row: each locks it before anything else, so the second settles after the first's commit.
    settle = queue_module.settle
    first_in = threading.Lock()

    def settle_together(conn: Connection, job_id: str, now: datetime) -> None:
        if first_in.acquire(blocking=False):
            with ledger.engine.connect() as watcher:
                waiting = sa.text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
                deadline = time.monotonic() + 10
                while not watcher.execute(waiting).scalar_one():
                    assert time.monotonic() < deadline, "the other worker never waited for the job row"
                    watcher.rollback()  # pg_stat_activity is read once per transaction: look again
                    time.sleep(0.01)
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


def test_a_claim_skips_a_row_another_transaction_holds(postgres_ledger: Ledger) -> None:
    ledger = postgres_ledger
    record(ledger, job(1), job(2))
    with ledger.engine.connect() as other:
        held = other.execute(
            sa.select(tasks.c.id, tasks.c.job_id).order_by(tasks.c.run_after, tasks.c.id).limit(1).with_for_update()
        ).one()
        claimed: list[Claim | None] = []
        claimer = threading.Thread(target=lambda: claimed.append(ledger.queue.claim("w1", 60)))
        claimer.start()
        # A claim that waited on the held row would still be waiting when this transaction ends.
        claimer.join(timeout=20)
        finished_while_held = not claimer.is_alive()
        other.rollback()
    claimer.join()
    assert finished_while_held
    (got,) = claimed
    assert got is not None
    assert got.tasks[0].job_id != held.job_id


@contextmanager
def notifications(ledger: Ledger) -> Iterator[Callable[[], int]]:
    """A listener on the workers' wake-up channel; calling it counts what arrived since the last call."""
    url = ledger.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as listener:
        listen(listener)
        yield lambda: len(list(listener.notifies(timeout=1, stop_after=1)))


def test_every_transaction_that_makes_work_due_wakes_the_workers(postgres_ledger: Ledger) -> None:
    ledger = postgres_ledger
    with notifications(ledger) as woken:
        record(ledger, job(1))  # a new job: the one-statement path
        assert woken()
        record(ledger, job(1, state="Failed"))  # another version of a known job: the general path
        assert woken()
        assert reject(ledger, claim(ledger), "output differs")
        assert ledger.jobs.replay(job(1).job_id, ["filesystem"]).verify
        assert woken()


def test_a_ledger_in_another_schema_wakes_only_its_own_workers(postgres_ledger: Ledger) -> None:
    with postgres_schema() as url, notifications(postgres_ledger) as woken:
        elsewhere = Ledger(url)
        elsewhere.migrate()
        record(elsewhere, job(1))  # another deployment's ledger in the same database
        assert not woken()
        record(postgres_ledger, job(1))
        assert woken()
        elsewhere.dispose()


def test_new_jobs_and_known_ones_in_one_callback_are_recorded_together(ledger: Ledger) -> None:
    record(ledger, job(2))
    recorded = record(ledger, job(3), job(2), job(1, tag="Other"))
    assert (recorded.job_ids, recorded.duplicates, recorded.ignored) == (
        (job(3).job_id, job(1).job_id),
        (job(2).job_id,),
        (job(1).job_id,),
    )
    assert [(t.kind, t.status) for t in ledger.views.show_job(job(3).job_id).tasks] == [("verify", "pending")]
    assert ledger.views.show_job(job(1).job_id).status == "ignored"


def test_a_connection_the_server_closed_is_replaced_before_it_is_used(postgres_ledger: Ledger) -> None:
    ledger = postgres_ledger
    record(ledger, job(1))  # the pool now holds an idle connection
    with ledger.engine.connect() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    admin = sa.create_engine(POSTGRES_URL)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            gone = sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
            while conn.execute(gone, {"pid": pid}).scalar_one():
                conn.rollback()  # pg_stat_activity is read once per transaction: look again
                time.sleep(0.01)
        # A backend leaves pg_stat_activity before its process exits and its socket closes.
        waited = time.monotonic() + 5
        while _process_exists(pid) and time.monotonic() < waited:
            time.sleep(0.01)
    finally:
        admin.dispose()
    assert record(ledger, job(2)).job_ids == (job(2).job_id,)


def _process_exists(pid: int) -> bool:
    """Whether ``pid`` still runs here (PostgreSQL on 127.0.0.1 runs on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_writer_takes_the_sqlite_write_lock_as_soon_as_another_process_lets_go(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    first, second = Ledger(url), Ledger(url)  # one engine each, as in two processes
    first.migrate()
    try:
        for hold in (0.02, 0.5):  # within the quick retries, and past them into SQLite's busy handler
            with first.engine.begin() as holder:
                waiting = threading.Thread(target=record, args=(second, job(int(hold * 100))))
                waiting.start()
                time.sleep(hold)
                assert waiting.is_alive()  # it waits for the lock rather than failing
                holder.execute(sa.text("SELECT 1"))
            waiting.join()
            assert first.views.show_job(job(int(hold * 100)).job_id).status == "received"
        with second.engine.connect() as conn:
            assert conn.execute(sa.text("PRAGMA busy_timeout")).scalar_one() == 30_000
    finally:
        first.dispose()
        second.dispose()
