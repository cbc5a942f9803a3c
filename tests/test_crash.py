"""A worker process killed with SIGKILL mid-delivery: after a restart, each sink has the job exactly once."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from support.pipeline import Pipeline, settings_env
from support.processes import start_worker
from support.receiver import Reply
from support.sink_dir import written

from webhook.sinks.events import event_id

pytestmark = pytest.mark.slow  # worker processes, SIGKILLed and restarted

LEASE = 2


def start(pipeline: Pipeline, log: Path) -> subprocess.Popen[bytes]:
    return start_worker(settings_env(pipeline.settings) | {"WEBHOOK_LEASE_SECONDS": str(LEASE)}, log)


def test_sigkill_mid_delivery_then_restart_delivers_exactly_once(pipeline: Pipeline, tmp_path: Path) -> None:
    # The http sink takes the request and does not answer: the worker is killed while it waits.
    pipeline.http.reply(Reply(200, delay=60), Reply(200))
    job_id = pipeline.submit(pipeline.upload_input())
    log = tmp_path / "worker.log"

    first = start(pipeline, log)
    try:
        pipeline.wait_until(lambda: len(pipeline.http.requests) == 1, what="the first http delivery attempt")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    interrupted = pipeline.ledger.views.show_job(job_id).to_dict()
    assert interrupted["status"] == "verified"
    assert [(d["sink"], d["status"]) for d in interrupted["deliveries"]] == [
        ("filesystem", "done"),
        ("http", "pending"),
    ]

    second = start(pipeline, log)
    try:
        # The killed worker's lease runs out, then the new one takes the delivery over.
        pipeline.wait_until(lambda: pipeline.status(job_id) == "delivered", timeout=LEASE + 20, what="redelivery")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=20)
    assert second.returncode == 0, log.read_text()

    view = pipeline.ledger.views.show_job(job_id).to_dict()
    assert [(d["sink"], d["status"], d["attempts"]) for d in view["deliveries"]] == [
        ("filesystem", "done", 1),
        ("http", "done", 2),
    ]
    assert written(pipeline.sink_dir) == [f"{job_id}.event.json", f"{job_id}.wav"]
    assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == pipeline.output_bytes()
    # At least once on the wire, exactly once for a receiver that deduplicates on webhook-id.
    assert len(pipeline.http.requests) == 2
    assert {r.headers["webhook-id"] for r in pipeline.http.requests} == {event_id(job_id, "http")}
