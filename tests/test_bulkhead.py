"""Bulkheads end to end, on SQLite and PostgreSQL: a worker whose http sink hangs (accepts the
connection, reads the request, never answers) keeps verifying new jobs and delivering them to
the filesystem sink, while the http sink's deliveries hold only its own slots and the rest wait."""

from __future__ import annotations

from support.pipeline import Pipeline, working
from support.trickle import Trickle

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
