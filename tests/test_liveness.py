"""Workers that die or stop give their work back: heartbeats, takeover at once, a bounded shutdown."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from support.pipeline import DONE, Pipeline, settings_env
from support.processes import start_worker
from support.receiver import Reply
from support.waiting import Paced, wait_for
from test_ledger import job, record

from webhook.ci.fetch import PART_PREFIX
from webhook.ledger import STALE_BEATS, Ledger, utcnow
from webhook.ledger.schema import tasks, workers
from webhook.models import Outcome
from webhook.worker.liveness import Heartbeat, Leases, pid_alive


def test_take_over_releases_leases_of_stale_gone_and_unknown_workers_only(ledger: Ledger) -> None:
    record(ledger, *(job(n) for n in range(4)))
    holders = ["live", "stale", "gone", "never-registered"]
    for holder in holders:
        assert ledger.queue.claim(holder, 300) is not None
    ledger.workers.beat("live", "here", 100)
    ledger.workers.beat("stale", "elsewhere", 200)
    ledger.workers.beat("gone", "here", 300)
    with ledger.engine.begin() as conn:
        conn.execute(
            workers.update().where(workers.c.id == "stale").values(heartbeat_at=utcnow() - timedelta(minutes=1))
        )

    taken = ledger.workers.take_over(15, "here", pid_alive=lambda pid: pid != 300)

    assert sorted(taken.dead) == ["gone", "stale"]
    assert taken.released == 3
    with ledger.engine.connect() as conn:
        leased = conn.execute(sa.select(tasks.c.locked_by).where(tasks.c.locked_by.is_not(None))).scalars().all()
    assert leased == ["live"]
    assert [w.id for w in ledger.workers.live()] == ["live"]
    assert ledger.queue.claim("next", 300) is not None  # a released task is due at once


@contextmanager
def paced(service: Heartbeat | Leases) -> Iterator[Paced]:
    """``service`` running in a thread, one pass each time the test steps it."""
    stopping = Paced()
    thread = stopping.run(service.name, service.run)
    try:
        yield stopping
    finally:
        stopping.stop()
        thread.join(timeout=30)
    assert not thread.is_alive()


def locked_until(ledger: Ledger, task_id: int) -> datetime:
    with ledger.engine.connect() as conn:
        until = conn.execute(sa.select(tasks.c.locked_until).where(tasks.c.id == task_id)).scalar_one()
    assert until is not None
    return until


def set_locked_until(ledger: Ledger, task_id: int, until: datetime) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(tasks.update().where(tasks.c.id == task_id).values(locked_until=until))


def set_heartbeat(ledger: Ledger, worker_id: str, at: datetime) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(workers.update().where(workers.c.id == worker_id).values(heartbeat_at=at))


LEASE = 300.0  # seconds: renewals every 100 s, were the passes not paced by the test


def test_leases_held_are_renewed_for_a_whole_lease(ledger: Ledger) -> None:
    record(ledger, job(1))
    claim = ledger.queue.claim("w1", LEASE)
    assert claim is not None
    task_id = claim.tasks[0].id
    leases = Leases(ledger, "w1", LEASE)
    with paced(leases) as stopping, leases.kept([task_id]):
        set_locked_until(ledger, task_id, utcnow() + timedelta(seconds=5))  # about to run out
        before = utcnow()
        stopping.step()
        renewed = locked_until(ledger, task_id)
    # Renewed from the time of renewal by a whole lease (the test's few seconds aside).
    assert renewed >= before + timedelta(seconds=LEASE - 60)


def test_leases_are_renewed_after_passes_that_held_none(ledger: Ledger) -> None:
    record(ledger, job(1))
    leases = Leases(ledger, "w1", LEASE)
    with paced(leases) as stopping:
        stopping.step(passes=3)  # nothing held: nothing to renew, and the renewal goes on
        claim = ledger.queue.claim("w1", LEASE)
        assert claim is not None
        task_id = claim.tasks[0].id
        with leases.kept([task_id]):
            set_locked_until(ledger, task_id, utcnow() + timedelta(seconds=5))
            stopping.step()
            assert locked_until(ledger, task_id) > utcnow() + timedelta(seconds=60)
        stopping.step()  # no longer held: left as it was
        assert locked_until(ledger, task_id) > utcnow() + timedelta(seconds=60)


def test_a_worker_beating_past_three_heartbeats_stays_live_and_keeps_its_leases(ledger: Ledger) -> None:
    interval = 10.0
    heartbeat = Heartbeat(ledger, "w1", interval, on_takeover=lambda: None)
    heartbeat.beat()  # registered, as the claim loop does before its first claim
    record(ledger, job(1))
    assert ledger.queue.claim("w1", LEASE) is not None
    with paced(heartbeat) as stopping:
        for _ in range(STALE_BEATS + 1):
            # One interval passes (its heartbeat made to look that much older), then the worker beats.
            beats = {w.id: w.heartbeat_at for w in ledger.workers.live()}
            assert "w1" in beats, "the worker was taken for dead while it beat"
            set_heartbeat(ledger, "w1", beats["w1"] - timedelta(seconds=interval))
            stopping.step()
        # Another worker on this host looks for dead workers between two beats.
        taken = ledger.workers.take_over(interval * STALE_BEATS, socket.gethostname(), pid_alive)
        assert (taken.dead, taken.released) == ((), 0)
        assert [w.id for w in ledger.workers.live()] == ["w1"]
    assert ledger.workers.live() == []  # left on stopping


def test_a_takeover_in_a_later_heartbeat_removes_the_dead_workers_partial_downloads(pipeline: Pipeline) -> None:
    worker = pipeline.worker()
    try:
        worker.heartbeat.beat()  # the first beat: registered, and the takeover at start done
        ledger, staging = pipeline.ledger, worker.staging.directory
        ledger.workers.beat("elsewhere:1:dead0001", "elsewhere", 1)
        ledger.workers.beat("elsewhere:2:a1e00002", "elsewhere", 2)
        set_heartbeat(ledger, "elsewhere:1:dead0001", utcnow() - timedelta(minutes=1))  # fell silent
        staging.mkdir(parents=True, exist_ok=True)
        tags = ("dead0001", "a1e00002", worker.staging.tag)
        parts = {tag: staging / f"{PART_PREFIX}{tag}-abc123.part" for tag in tags}
        for part in parts.values():
            part.write_bytes(b"half")

        worker.heartbeat.beat()

        assert sorted(w.id for w in ledger.workers.live()) == sorted(["elsewhere:2:a1e00002", worker.worker_id])
        assert sorted(p.name for p in staging.glob("*.part")) == sorted(
            parts[tag].name for tag in ("a1e00002", worker.staging.tag)
        )
    finally:
        worker.heartbeat.leave()
        worker.close()


PROCESS_START = 60  # seconds a worker process may take to start and claim on a busy machine


def worker_env(pipeline: Pipeline, **more: str) -> dict[str, str]:
    return (
        settings_env(pipeline.settings)
        | {
            "WEBHOOK_TEMP_DIR": pipeline.settings.temp_dir,
            "WEBHOOK_LEASE_SECONDS": "300",
            "WEBHOOK_HEARTBEAT_SECONDS": "1",
            "WEBHOOK_HTTP_SINK_TIMEOUT": "120",
        }
        | more
    )


def holder_of(pipeline: Pipeline, job_id: str) -> str | None:
    with pipeline.ledger.engine.connect() as conn:
        return conn.execute(
            sa.select(tasks.c.locked_by).where(tasks.c.job_id == job_id, tasks.c.sink == "http")
        ).scalar_one_or_none()


@pytest.mark.slow  # worker processes
def test_a_killed_workers_job_is_taken_over_at_once_and_its_partial_downloads_removed(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    pipeline.http.reply(Reply(delay=120), Reply(200))  # the first delivery hangs
    log = tmp_path / "workers.log"
    first = start_worker(worker_env(pipeline), log)
    try:
        job_id = pipeline.submit(pipeline.upload_input())
        wait_for(
            lambda: len(pipeline.http.requests) == 1, "the first worker to be stuck in the http delivery", PROCESS_START
        )
        dead_id = holder_of(pipeline, job_id)
        assert dead_id is not None
        staging = Path(pipeline.settings.temp_dir) / "cos-webhook-staged"
        partial = staging / f"cos-webhook-{dead_id.rsplit(':', 1)[-1]}-abc123.part"  # a download it left
        partial.write_bytes(b"half")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()

    second = start_worker(worker_env(pipeline), log)
    try:
        # The lease has 300 s to run: delivery within this wait shows it was taken over, not waited out.
        wait_for(lambda: pipeline.status(job_id) in DONE, "the job to be taken over and delivered", PROCESS_START)
    finally:
        second.terminate()
        assert second.wait(timeout=30) == 0
    assert pipeline.status(job_id) == "delivered"
    assert len(pipeline.http.requests) == 2
    assert not partial.exists()
    assert f"took over from dead workers {dead_id}" in log.read_text()
    assert pipeline.ledger.workers.live() == []  # the second left on SIGTERM


@pytest.mark.slow  # worker processes
def test_sigterm_abandons_work_past_the_budget_and_releases_it_for_another_worker(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    pipeline.http.reply(Reply(delay=120), Reply(200))
    log = tmp_path / "worker.log"
    worker = start_worker(worker_env(pipeline, WEBHOOK_SHUTDOWN_SECONDS="1"), log)
    try:
        job_id = pipeline.submit(pipeline.upload_input())
        wait_for(lambda: len(pipeline.http.requests) == 1, "the worker to be stuck in the http delivery", PROCESS_START)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()

    assert "abandoning it" in log.read_text()
    assert holder_of(pipeline, job_id) is None
    view = pipeline.ledger.views.show_job(job_id)
    http = next(t for t in view.tasks if t.sink == "http")
    assert http.status == "pending"
    assert http.run_after <= utcnow()
    abandoned = [a for a in view.attempts if a.outcome == Outcome.ABANDONED]
    assert [(a.step, a.sink) for a in abandoned] == [("deliver", "http")]
    assert "abandoned: worker shutting down" in abandoned[0].error

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"
    assert len(pipeline.http.requests) == 2


@pytest.mark.slow  # worker processes
def test_sigterm_lets_quick_in_flight_work_finish(pipeline: Pipeline, tmp_path: Path) -> None:
    pipeline.http.reply(Reply(delay=1.0))
    log = tmp_path / "worker.log"
    worker = start_worker(worker_env(pipeline, WEBHOOK_SHUTDOWN_SECONDS="60"), log)
    try:
        job_id = pipeline.submit(pipeline.upload_input())
        wait_for(lambda: len(pipeline.http.requests) == 1, "the worker to be in the http delivery", PROCESS_START)
        os.kill(worker.pid, signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
    assert pipeline.status(job_id) == "delivered"
    assert "abandoning" not in log.read_text()
