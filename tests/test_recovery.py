"""One failure stays one failure, and every job has a way back: against the sandbox, on both ledgers."""

from __future__ import annotations

import json
import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from support.endpoint import post, serving
from support.pipeline import BUCKET, DONE, Pipeline, forged, settings_env
from support.receiver import Receiver
from support.samples import body, job

from webhook.cli import main
from webhook.dev.sandbox import Fault
from webhook.ledger import Ledger
from webhook.ledger.schema import jobs, versions
from webhook.models import Event
from webhook.sinks import Sink
from webhook.sinks.config import SPECS
from webhook.sinks.options import FilesystemOptions
from webhook.worker.runtime import Worker


def genuine_callback(pipeline: Pipeline) -> tuple[str, bytes]:
    """A finished job whose genuine callback went elsewhere: its JobId and the body CI sent."""
    with Receiver() as elsewhere:
        job_id = pipeline.submit(pipeline.upload_input(), callback_url=elsewhere.url)
        return job_id, pipeline.sandbox.wait_for_callbacks(1, timeout=20)[0].body


def test_forgery_first_and_the_genuine_callback_right_after_is_delivered_once(pipeline: Pipeline) -> None:
    job_id, genuine = genuine_callback(pipeline)

    forgery = pipeline.post_callback(forged(job_id, output_key="out/stolen.wav"))
    answer = pipeline.post_callback(genuine)  # before any worker has looked at the forgery

    assert forgery.json()["jobs"] == answer.json()["jobs"] == [{"job_id": job_id, "duplicate": False}]
    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"
    assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == pipeline.output_bytes()
    assert len(pipeline.http.requests) == 1
    view = pipeline.ledger.views.show_job(job_id).to_dict()
    assert [(c["status"], c["reason"]) for c in view["callbacks"]] == [
        (
            "rejected",
            f"output differs: callback says '{BUCKET}/out/stolen.wav in ap-guangzhou', "
            f"CI says '{BUCKET}/out/denoised.wav in ap-guangzhou'",
        ),
        ("accepted", ""),
    ]
    assert view["detail"]["output"]["key"] == "out/denoised.wav"


def test_a_callback_repeated_word_for_word_is_a_duplicate(pipeline: Pipeline) -> None:
    job_id, genuine = genuine_callback(pipeline)
    assert pipeline.post_callback(genuine).json()["duplicate"] is False
    assert pipeline.post_callback(genuine).json()["duplicate"] is True
    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"
    assert len(pipeline.ledger.views.show_job(job_id).versions) == 1


def test_overlapping_multi_job_callbacks_never_deadlock(ledger: Ledger) -> None:
    ids = [f"j{n:032x}" for n in range(6)]
    rng = random.Random(7)
    bodies = []
    for n in range(80):
        order = ids[::-1] if n % 2 else list(ids)
        if n % 3 == 0:
            rng.shuffle(order)
        bodies.append(body("json", [job(i) for i in order]))
    with serving(ledger) as url, ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(lambda data: post(url, data).status_code, bodies))
    assert statuses == [200] * len(bodies)
    assert sorted(view.job_id for view in ledger.views.list_jobs(limit=100)) == ids


def set_stored_job(ledger: Ledger, job_id: str, detail: str) -> None:
    """Overwrite what the ledger holds for the job, as another version of the service might have written it."""
    with ledger.engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.job_id == job_id).values(detail=detail))
        conn.execute(versions.update().where(versions.c.job_id == job_id).values(detail=detail))


def test_unknown_fields_in_a_stored_job_are_ignored(pipeline: Pipeline) -> None:
    job_id = pipeline.submit(pipeline.upload_input())
    pipeline.wait_until(lambda: pipeline.status(job_id) == "received", what="the callback")
    stored = pipeline.ledger.views.show_job(job_id).to_dict()["detail"]
    set_stored_job(pipeline.ledger, job_id, json.dumps(stored | {"renamed_later": 1, "queue_type": None}))

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"
    assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == pipeline.output_bytes()


def test_an_unreadable_job_row_is_a_dead_task_and_the_queue_goes_on(pipeline: Pipeline) -> None:
    broken = pipeline.submit(pipeline.upload_input())
    pipeline.wait_until(lambda: pipeline.status(broken) == "received", what="the first callback")
    set_stored_job(pipeline.ledger, broken, '{"job_id": 42')
    fine = pipeline.submit(pipeline.upload_input("in/second.wav"), output_key="out/second.wav")

    worker = pipeline.worker()
    assert pipeline.drain(worker, broken, DONE) == "dead"
    assert pipeline.drain(worker, fine, DONE) == "delivered"
    view = pipeline.ledger.views.show_job(broken)
    assert view.job is None
    assert view.unreadable.startswith("unreadable job row: ")
    (verify,) = view.to_dict()["verify"]
    assert (verify["status"], verify["attempts"]) == ("dead", 1)
    assert verify["last_error"].startswith("unreadable job row: ")
    assert broken in [v.job_id for v in pipeline.ledger.views.list_jobs()]


class Exploding(Sink):
    """A sink with a bug: it raises something other than DeliveryError."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    def deliver(self, event: Event) -> None:
        self.calls += 1
        raise RuntimeError(f"bug in {self.name} on call {self.calls}")


def test_a_sink_that_raises_costs_only_its_own_delivery_attempts(pipeline: Pipeline, tmp_path: Path) -> None:
    worker = pipeline.worker()
    options = FilesystemOptions(dir=str(tmp_path / "unused"))
    retry = pipeline.settings.retry
    worker.pipeline.specs["buggy"] = SPECS["filesystem"](name="buggy", type="filesystem", options=options, retry=retry)
    worker.sinks["buggy"] = buggy = Exploding("buggy")
    first = pipeline.submit(pipeline.upload_input())
    second = pipeline.submit(pipeline.upload_input("in/second.wav"), output_key="out/second.wav")

    assert pipeline.drain(worker, first, DONE) == "dead"
    assert pipeline.drain(worker, second, DONE) == "dead"
    for job_id in (first, second):
        deliveries = {d["sink"]: d for d in pipeline.ledger.views.show_job(job_id).to_dict()["deliveries"]}
        assert (deliveries["filesystem"]["status"], deliveries["http"]["status"]) == ("done", "done")
        assert deliveries["buggy"]["status"] == "dead"
        assert deliveries["buggy"]["attempts"] == pipeline.settings.retry.max_attempts
        assert deliveries["buggy"]["last_error"].startswith("RuntimeError: bug in buggy on call ")
    assert buggy.calls == 2 * pipeline.settings.retry.max_attempts


@pytest.mark.slow  # the SDK waits a second before each retry of CI's 503s
def test_a_ci_outage_longer_than_a_delivery_budget_does_not_kill_verification(pipeline: Pipeline) -> None:
    # The SDK itself tries each call twice, so this outlasts the delivery budget's attempts.
    budget = pipeline.settings.retry.max_attempts
    pipeline.sandbox.faults.add(Fault(kind="CI describe", status=503, times=2 * (budget + 1)))
    job_id = pipeline.submit(pipeline.upload_input())

    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"
    (verify,) = pipeline.ledger.views.show_job(job_id).to_dict()["verify"]
    assert budget < verify["attempts"] <= pipeline.settings.verify_retry.max_attempts


# dead: CI answers 503 throughout, and the SDK waits a second before each retry.
@pytest.mark.parametrize("status", ["rejected", pytest.param("dead", marks=pytest.mark.slow)])
def test_a_job_rejected_or_dead_in_verification_is_verified_again_by_a_repeated_callback(
    pipeline: Pipeline, status: str
) -> None:
    job_id, genuine = genuine_callback(pipeline)
    allowlist = pipeline.settings.allowed_buckets
    if status == "rejected":  # the allowlist did not have the bucket yet
        worker = pipeline.worker()
        allow = worker.pipeline.allow
        worker.pipeline.allow = type(allow)(frozenset({"other-1250000000"}), allow.regions, allow.tags)
    else:  # CI was away for the whole verification budget
        pipeline.sandbox.faults.add(Fault(kind="CI describe", status=503))
        worker = Worker.from_settings(pipeline.settings.replace(verify_retry=pipeline.settings.retry), pipeline.ledger)
    pipeline.post_callback(genuine)
    assert pipeline.drain(worker, job_id, DONE) == status
    assert pipeline.post_callback(genuine).json()["duplicate"] is (status == "rejected")

    pipeline.sandbox.faults.clear()
    assert allowlist == pipeline.settings.allowed_buckets
    if status == "rejected":
        assert pipeline.ledger.jobs.replay(job_id, ["filesystem", "http"]).verify
    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"
    with pipeline.ledger.engine.connect() as conn:
        statuses = conn.execute(sa.select(versions.c.status).where(versions.c.job_id == job_id)).scalars().all()
    assert statuses == ["accepted"]


def cli(pipeline: Pipeline, *args: str) -> Result:
    result = CliRunner().invoke(main, list(args), env=settings_env(pipeline.settings))
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow  # the SDK waits a second before each retry of CI's 503s
def test_a_verification_that_died_in_a_ci_outage_is_listed_and_replayed(pipeline: Pipeline) -> None:
    pipeline.settings = pipeline.settings.replace(verify_retry=pipeline.settings.retry)
    pipeline.sandbox.faults.add(Fault(kind="CI describe", status=503))
    job_id = pipeline.submit(pipeline.upload_input())
    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "dead"

    (letter,) = [json.loads(line) for line in cli(pipeline, "dead", "list", "--json").output.splitlines()]
    assert (letter["kind"], letter["job_id"], letter["sink"]) == ("verify", job_id, None)
    assert letter["last_error"].startswith("CI answered 503 ServiceUnavailable")
    attempts = pipeline.settings.retry.max_attempts
    assert re.search(rf"^{job_id} +verify +- +{attempts} ", cli(pipeline, "dead", "list").output, re.MULTILINE)
    assert cli(pipeline, "dead", "list", "--json", "--sink", "http").output == ""

    pipeline.sandbox.faults.clear()
    assert cli(pipeline, "replay", "--dead").output.endswith("1 dead letters scheduled again\n")
    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"
    assert cli(pipeline, "dead", "list", "--json").output == ""
    (verify,) = pipeline.ledger.views.show_job(job_id).to_dict()["verify"]
    assert (verify["status"], verify["attempts"]) == ("done", 1)


def test_rejected_jobs_are_verified_again_once_the_cause_is_fixed(pipeline: Pipeline) -> None:
    narrow = pipeline.settings.replace(allowed_buckets=frozenset({"other-1250000000"}))
    jobs_ids = [pipeline.submit(pipeline.upload_input(), output_key=f"out/{n}.wav") for n in range(3)]
    worker = Worker.from_settings(narrow, pipeline.ledger)
    for job_id in jobs_ids:
        assert pipeline.drain(worker, job_id, DONE) == "rejected"
        assert pipeline.ledger.views.show_job(job_id).reason.endswith("is not in WEBHOOK_ALLOWED_BUCKETS")

    # The allowlist is fixed: replay one by its id, then the rest of the last hour's rejections.
    assert (
        cli(pipeline, "replay", jobs_ids[0]).output
        == f"{jobs_ids[0]} will be verified again: delivered if CI now confirms it, else rejected again\n"
    )
    assert cli(pipeline, "replay", "--rejected", "--since", "1h").output.endswith("2 rejected jobs scheduled again\n")
    worker = pipeline.worker()
    for job_id in jobs_ids:
        assert pipeline.drain(worker, job_id, DONE) == "delivered"
    assert len(pipeline.http.requests) == 3
