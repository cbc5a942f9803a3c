"""Receivers and workers meet on the same job and task rows without deadlocking, and a receiver
never waits on a verification in progress.

Receivers lock a callback's jobs in job id order, then their tasks in task id order; workers lock a
job before its tasks; lease renewal skips rows another transaction holds. The PostgreSQL test below
counts the database's own deadlocks (``pg_stat_database``), in a database of its own so that no
other test's can count.
"""

from __future__ import annotations

import dataclasses
import json
import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests
import sqlalchemy as sa
from support.pipeline import Pipeline, run_one
from support.samples import numbered_job as job
from support.services import POSTGRES_URL, require_service

from webhook.dev.sandbox.faults import Fault
from webhook.intake.triage import triage
from webhook.ledger import Ledger, LedgerUnavailable, RawRequest, VerifyClaim
from webhook.models import Callback, Job, job_to_dict

TAGS = frozenset({"NoiseReduction"})
JOBS = 24  # named by each callback in groups of PER_CALLBACK
PER_CALLBACK = 6
RECEIVERS, WORKERS, ROUNDS = 4, 3, 40


@contextmanager
def postgres_database() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped afterwards: its statistics are its own."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def deadlocks(url: str) -> int:
    """How many deadlocks the database has seen, once every other connection to it has gone (a
    server process reports what it counted as it exits), from a connection of its own."""
    engine = sa.create_engine(url)
    others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    try:
        with engine.connect() as conn:
            deadline = time.monotonic() + 30
            while conn.execute(sa.text(others)).scalar_one():
                assert time.monotonic() < deadline, "connections to the test database stay open"
                time.sleep(0.02)
            conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
            found = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
            return int(conn.execute(sa.text(found)).scalar_one())
    finally:
        engine.dispose()


def record(ledger: Ledger, *jobs: Job) -> None:
    body = {"EventName": "WorkflowFinish", "JobsDetail": [job_to_dict(j) for j in jobs]}
    raw = RawRequest(json.dumps(body).encode(), "application/json", {}, "10.0.0.1")
    parsed = Callback(event_name="WorkflowFinish", jobs=jobs, body_format="json")
    # No cap within reach: every new version makes the job's verify task due again.
    ledger.jobs.record(raw, parsed, triage(parsed, TAGS), max_versions=RECEIVERS * ROUNDS + 1)


@pytest.mark.postgres
def test_overlapping_callbacks_and_lease_renewals_do_not_deadlock() -> None:
    with postgres_database() as url:
        ledger = Ledger(url)
        ledger.migrate()
        # Recorded last first: the verify tasks' ids run against their jobs' ids, so that locking
        # in job id order and locking in task id order are two different orders.
        for n in reversed(range(JOBS)):
            record(ledger, job(n))
        ledger.dispose()  # its connections close (and report): the engine opens new ones when used
        before = deadlocks(url)
        failures: list[str] = []
        receiving = threading.Barrier(RECEIVERS + WORKERS)
        received = threading.Event()

        def receive(seed: int) -> None:
            rng = random.Random(seed)
            receiving.wait()
            for round_ in range(ROUNDS):
                # A new version of each job (its user data differs), so every callback makes its
                # jobs' verify tasks due again: the rows workers hold and renew.
                picked = rng.sample(range(JOBS), PER_CALLBACK)
                versions = [dataclasses.replace(job(n), user_data=f"{seed}-{round_}") for n in picked]
                try:
                    record(ledger, *versions)
                except LedgerUnavailable as exc:
                    failures.append(f"receiver: {exc.detail}")

        def work(worker_id: str) -> None:
            held: dict[int, VerifyClaim] = {}
            receiving.wait()
            while not received.is_set():
                try:
                    for claim in ledger.queue.claim_many(worker_id, 60, PER_CALLBACK):
                        assert isinstance(claim, VerifyClaim)
                        held[claim.task.id] = claim
                    # As the worker's lease renewal does: every task it holds, in id order.
                    ledger.queue.extend_lease(sorted(held), worker_id, 60)
                    if len(held) > PER_CALLBACK:  # and a verification ends: the job and its versions change
                        claim = held.pop(min(held))
                        verdicts = {version.id: "output differs" for version in claim.versions}
                        ledger.queue.reject(claim.task, worker_id, "output differs", verdicts)
                except LedgerUnavailable as exc:
                    failures.append(f"{worker_id}: {exc.detail}")
                except Exception as exc:  # a failed assertion in this thread fails the test
                    failures.append(f"{worker_id}: {exc!r}")
                    return

        workers = [threading.Thread(target=work, args=(f"w{n}",)) for n in range(WORKERS)]
        receivers = [threading.Thread(target=receive, args=(n,)) for n in range(RECEIVERS)]
        for thread in workers + receivers:
            thread.start()
        for thread in receivers:
            thread.join()
        received.set()
        for thread in workers:
            thread.join()
        ledger.dispose()
        assert failures == []
        assert deadlocks(url) == before


@pytest.mark.postgres
def test_lease_renewal_skips_a_task_another_transaction_holds_and_renews_it_next_time() -> None:
    with postgres_database() as url:
        # Waiting on a lock fails at once instead of hanging the test: renewal must not wait at all.
        ledger = Ledger(f"{url}?options=-clock_timeout%3D5s")
        ledger.migrate()
        try:
            for n in range(2):
                record(ledger, job(n))
            claims = ledger.queue.claim_many("w1", 60, 2)
            first, second = sorted(claim.tasks[0].id for claim in claims)
            with ledger.engine.begin() as holder:  # as a receiver making the task due again would
                holder.execute(sa.text("SELECT FROM tasks WHERE id = :id FOR UPDATE"), {"id": first})
                assert ledger.queue.extend_lease([first, second], "w1", 60) == 1
            assert ledger.queue.extend_lease([first, second], "w1", 60) == 2
        finally:
            ledger.dispose()


def test_a_callback_for_a_job_being_verified_is_answered_meanwhile(pipeline: Pipeline) -> None:
    job_id = pipeline.submit(pipeline.upload_input())
    pipeline.sandbox.wait_for_callbacks(1, timeout=20)
    # CI's answer to the worker's DescribeMediaJob is held back until the faults are cleared.
    held = pipeline.sandbox.faults.add(Fault(kind="CI describe", delay=120))
    worker = pipeline.worker()
    verifying = threading.Thread(target=run_one, args=(worker,))
    try:
        verifying.start()
        pipeline.wait_until(lambda: held.fired > 0, what="the worker's question to CI")
        # The same job again, saying something new: a second version, recorded while the first is verified.
        sent = json.loads(pipeline.ledger.views.raw_callbacks(job_id)[0].body)
        sent["JobsDetail"]["Operation"]["UserData"] = "said again"
        answered = requests.post(pipeline.callback_url, json=sent, timeout=30)
        assert answered.status_code == 200, answered.text
        assert verifying.is_alive()  # the worker is still waiting for CI's answer
    finally:
        pipeline.sandbox.faults.clear()
        verifying.join(timeout=30)
        worker.close()
    assert len(pipeline.ledger.views.show_job(job_id).versions) == 2
