"""Idle workers are woken by the ledger, not by their poll interval; several claims run at once."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from support.pipeline import DONE, Pipeline, working
from support.receiver import Reply
from test_ledger import job, record

from webhook.ledger import Ledger
from webhook.ledger import wakeup as wakeup_module
from webhook.ledger.schema import tasks
from webhook.ledger.wakeup import Wakeup, notify

# Far longer than any test here waits: only a wake-up can explain work seen sooner.
NEVER = 3600.0


@contextmanager
def watching(ledger: Ledger) -> Iterator[Wakeup]:
    """A worker's wake-up service, watching in a thread of its own."""
    waiting, stopping = Wakeup(ledger.engine), threading.Event()
    thread = threading.Thread(target=waiting.run, args=(stopping,), name=waiting.name, daemon=True)
    thread.start()
    waiting.wait(5)  # the first check (or LISTEN) reports anything before it: start from quiet
    try:
        yield waiting
    finally:
        stopping.set()
        thread.join(timeout=10)


@pytest.fixture
def wakeup(ledger: Ledger) -> Iterator[Wakeup]:
    with watching(ledger) as waiting:
        yield waiting


def test_a_committed_callback_wakes_a_waiting_worker(ledger: Ledger, wakeup: Wakeup) -> None:
    assert not wakeup.wait(0.3)  # nothing happened: no wake-up
    record(ledger, job(1))
    assert wakeup.wait(10)


def test_a_rolled_back_transaction_wakes_no_one(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    # A channel of its own: whatever else commits work on this database (other tests, other test
    # runs) notifies the shared one, and this test asserts that nothing arrives.
    monkeypatch.setattr(wakeup_module, "CHANNEL", f"cos_webhook_work_{uuid.uuid4().hex[:12]}")
    with watching(ledger) as wakeup:
        with ledger.engine.connect() as conn, conn.begin() as transaction:
            notify(conn)
            conn.execute(tasks.delete())
            transaction.rollback()
        assert not wakeup.wait(0.5)
        with ledger.engine.begin() as conn:
            notify(conn)
            conn.execute(sa.text("CREATE TABLE touched (n INTEGER)"))  # a commit that changes the file
        assert wakeup.wait(10)


def delivered(pipeline: Pipeline, job_id: str) -> str:
    """The job's status once the worker running beside the test has finished with it."""
    pipeline.wait_until(lambda: pipeline.status(job_id) in DONE, timeout=30, what=f"job {job_id} to finish")
    return pipeline.status(job_id)


def test_an_idle_worker_delivers_a_new_callback_without_waiting_for_its_poll(pipeline: Pipeline) -> None:
    settings = pipeline.settings.replace(poll_interval=NEVER)
    with working(settings, pipeline.ledger) as worker:
        pipeline.wait_until(lambda: worker.heartbeat.running, what="the worker to start")
        job_id = pipeline.submit(pipeline.upload_input())
        assert delivered(pipeline, job_id) == "delivered"


def test_a_sink_that_hangs_holds_up_only_its_own_job(pipeline: Pipeline) -> None:
    # The first http delivery is held far past the others; with one claim at a time every later
    # job would wait behind it.
    released = threading.Event()
    pipeline.http.reply(Reply(200, hold=released), Reply(200))
    first = pipeline.submit(pipeline.upload_input())
    settings = pipeline.settings.replace(worker_concurrency=4, http_sink_timeout=NEVER)
    with working(settings, pipeline.ledger):
        pipeline.wait_until(lambda: len(pipeline.http.requests) == 1, what="the first delivery to be held")
        later = [pipeline.submit(pipeline.upload_input()) for _ in range(3)]
        for job_id in later:
            assert delivered(pipeline, job_id) == "delivered"
        assert pipeline.status(first) == "verified"
        assert len(pipeline.http.requests) == 4  # the held one was not sent again meanwhile
        released.set()
        assert delivered(pipeline, first) == "delivered"
