"""Workers that die or stop give their work back: heartbeats, takeover at once, a bounded shutdown."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from support.pipeline import DONE, Pipeline, settings_env
from support.processes import start_worker
from support.receiver import Reply
from test_ledger import job, record

from webhook.ledger import Ledger, utcnow
from webhook.ledger.schema import tasks, workers
from webhook.models import Outcome


def wait_for(condition: object, what: str, timeout: float = 60) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


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


def test_a_killed_workers_job_is_taken_over_at_once_and_its_partial_downloads_removed(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    pipeline.http.reply(Reply(delay=120), Reply(200))  # the first delivery hangs
    log = tmp_path / "workers.log"
    first = start_worker(worker_env(pipeline), log)
    try:
        job_id = pipeline.submit(pipeline.upload_input())
        wait_for(lambda: len(pipeline.http.requests) == 1, "the first worker to be stuck in the http delivery")
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
        wait_for(lambda: pipeline.status(job_id) in DONE, "the job to be taken over and delivered")
    finally:
        second.terminate()
        assert second.wait(timeout=30) == 0
    assert pipeline.status(job_id) == "delivered"
    assert len(pipeline.http.requests) == 2
    assert not partial.exists()
    assert f"took over from dead workers {dead_id}" in log.read_text()
    assert pipeline.ledger.workers.live() == []  # the second left on SIGTERM


def test_sigterm_abandons_work_past_the_budget_and_releases_it_for_another_worker(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    pipeline.http.reply(Reply(delay=120), Reply(200))
    log = tmp_path / "worker.log"
    worker = start_worker(worker_env(pipeline, WEBHOOK_SHUTDOWN_SECONDS="1"), log)
    try:
        job_id = pipeline.submit(pipeline.upload_input())
        wait_for(lambda: len(pipeline.http.requests) == 1, "the worker to be stuck in the http delivery")
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


def test_sigterm_lets_quick_in_flight_work_finish(pipeline: Pipeline, tmp_path: Path) -> None:
    pipeline.http.reply(Reply(delay=1.0))
    log = tmp_path / "worker.log"
    worker = start_worker(worker_env(pipeline, WEBHOOK_SHUTDOWN_SECONDS="60"), log)
    try:
        job_id = pipeline.submit(pipeline.upload_input())
        wait_for(lambda: len(pipeline.http.requests) == 1, "the worker to be in the http delivery")
        os.kill(worker.pid, signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
    assert pipeline.status(job_id) == "delivered"
    assert "abandoning" not in log.read_text()
