"""Bulkheads and breakers end to end, on SQLite and PostgreSQL: a worker whose http sink hangs
(accepts the connection, reads the request, never answers) keeps verifying new jobs and
delivering them to the filesystem sink, while the http sink's deliveries hold only its own slots
and the rest wait; a sink that keeps failing is paused, probed and resumed."""

from __future__ import annotations

import logging

import pytest
from support.pipeline import Pipeline, working
from support.receiver import Reply
from support.trickle import Trickle

from webhook.ledger import Breaker
from webhook.retry import BreakerPolicy, RetryPolicy

HTTP_SLOTS = 2


def test_a_hanging_http_sink_holds_only_its_own_slots(pipeline: Pipeline) -> None:
    with Trickle(answer=None) as hanging:
        settings = pipeline.settings.replace(
            http_sink_url=f"{hanging.url}/hooks",
            http_sink_timeout=600,  # hangs for the whole test
            worker_concurrency=2,
            sink_concurrency=HTTP_SLOTS,
            shutdown_seconds=10,
        )
        key = pipeline.upload_input()
        with working(settings, pipeline.ledger):
            first = [pipeline.submit(key, output_key=f"out/{n}.wav") for n in range(HTTP_SLOTS)]
            hanging.wait_for_requests(HTTP_SLOTS, timeout=30)  # every http slot is taken now

            later = [pipeline.submit(key, output_key=f"out/{n}.wav") for n in range(HTTP_SLOTS, 3 * HTTP_SLOTS)]
            for job_id in first + later:
                pipeline.wait_until(
                    lambda job_id=job_id: (pipeline.sink_dir / f"{job_id}.event.json").exists(),
                    timeout=30,
                    what=f"{job_id} in the filesystem sink",
                )
            for job_id in first + later:
                assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == pipeline.output_bytes("out/0.wav")
            assert hanging.requests == HTTP_SLOTS  # no further http delivery was leased: no slot for it
            deliveries = {job_id: deliveries_of(pipeline, job_id) for job_id in first + later}
            hanging.stop()  # the worker can stop: its hanging deliveries fail and are retried later
    assert all(pipeline.status(job_id) in ("verified", "delivered") for job_id in first + later)
    assert {job_id: d["filesystem"] for job_id, d in deliveries.items()} == dict.fromkeys(first + later, ("done", 1))
    assert [deliveries[job_id]["http"] for job_id in first] == [("pending", 1)] * HTTP_SLOTS  # hanging
    # Waiting for a slot of their own: created due, never leased, no attempt spent.
    assert [deliveries[job_id]["http"] for job_id in later] == [("pending", 0)] * len(later)


def deliveries_of(pipeline: Pipeline, job_id: str) -> dict[str, tuple[str, int]]:
    view = pipeline.ledger.views.show_job(job_id).to_dict()
    return {d["sink"]: (d["status"], d["attempts"]) for d in view["deliveries"]}


def test_a_failing_sink_is_paused_then_probed_and_resumed(pipeline: Pipeline, caplog: pytest.LogCaptureFixture) -> None:
    """One http slot, so deliveries go out one after another: two 503s open the breaker; after the
    pause one probe is sent, its 200 closes the breaker and every other delivery goes out once."""
    caplog.set_level(logging.INFO, logger="webhook.worker")
    pipeline.http.reply(Reply(503), Reply(503), Reply(200))
    settings = pipeline.settings.replace(
        sink_concurrency=1,
        breaker=BreakerPolicy(failures=2, pause=0.5),
        retry=RetryPolicy(max_attempts=50, backoff_base=0.01, backoff_cap=0.05),
    )
    key = pipeline.upload_input()
    with working(settings, pipeline.ledger):
        job_ids = [pipeline.submit(key, output_key=f"out/{n}.wav") for n in range(3)]
        for job_id in job_ids:
            pipeline.wait_until(lambda job_id=job_id: pipeline.status(job_id) == "delivered", what=job_id)
    assert len(pipeline.http.requests) == 2 + len(job_ids)  # nothing was sent while the sink was paused
    messages = [record.getMessage() for record in caplog.records]
    assert [m for m in messages if "paused" in m] == [
        "sink http paused for 0.5s after 2 failed deliveries in a row: its deliveries wait"
    ]
    assert messages.count("sink http works again: breaker closed") == 1
    assert pipeline.ledger.breakers.all()["http"] == Breaker("http")
