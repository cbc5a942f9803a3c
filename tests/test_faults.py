"""Faults in the dependencies: a flaky COS or CI (sandbox faults), and the ledger database going away.

Every fault must leave the job pending with the problem named, forward nothing while it lasts,
and end in the same delivery as without it once it clears.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from support.pipeline import BUCKET, DONE, TOKEN, Pipeline, multipart_file, run_one, settings_env
from support.processes import start_worker, wait_healthy, web
from support.sink_dir import written
from support.tcp_proxy import proxied_database

from webhook.ci.client import make_client
from webhook.ci.crc64 import crc64ecma
from webhook.dev.sandbox import Fault
from webhook.worker.runtime import Worker

OUTPUT = "out/denoised.wav"


def attempt(pipeline: Pipeline, worker: Worker) -> None:
    """Let ``worker`` run the next due task (a retry is due after a short backoff)."""
    pipeline.wait_until(lambda: run_one(worker), timeout=20, what="a due task")


def assert_nothing_forwarded(pipeline: Pipeline) -> None:
    assert pipeline.http.requests == []
    assert not pipeline.sink_dir.exists() or written(pipeline.sink_dir) == []


def assert_delivered_intact(pipeline: Pipeline, job_id: str) -> None:
    expected = pipeline.output_bytes()
    assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == expected
    (request,) = pipeline.http.requests
    assert multipart_file(request)[1] == expected


def submitted(pipeline: Pipeline) -> tuple[str, Worker]:
    """A genuine job and a worker: its first claim verifies the job, then fetches for its deliveries."""
    job_id = pipeline.submit(pipeline.upload_input())
    output = pipeline.sandbox.object_path(BUCKET, OUTPUT)
    pipeline.wait_until(output.exists, what="the job's output in the sandbox")
    return job_id, pipeline.worker()


# --- COS: the output object's GET --------------------------------------------------------


# Each fault, and a pattern of the last_error it must leave, given the object's size and CRC64.
GET_FAULTS: dict[str, tuple[Fault, Callable[[int, int], str]]] = {
    "503": (
        Fault(kind="object GET", status=503),
        lambda _, __: re.escape(f"COS answered 503 ServiceUnavailable for {OUTPUT}"),
    ),
    # The reset can take the bytes already received with it: 0 or 1000 were read.
    "reset": (
        Fault(kind="object GET", reset=1000),
        lambda _, __: rf"download of {re.escape(OUTPUT)} broke off after (0|1000) bytes: .*ConnectionResetError\(104, ",
    ),
    # urllib3 enforces Content-Length: a short body raises before fetch.py's own length check.
    "truncate": (
        Fault(kind="object GET", truncate=1000),
        lambda size, _: re.escape(
            f"download of {OUTPUT} broke off after 1000 bytes: ('Connection broken: "
            f"IncompleteRead(1000 bytes read, {size - 1000} more expected)'"
        ),
    ),
    "bad-crc": (
        Fault(kind="object GET", bad_crc=True),
        lambda _, crc: re.escape(f"{OUTPUT} failed its CRC64 check: COS says {crc ^ 1}, got {crc}"),
    ),
}


# The SDK pauses before retrying a 5xx itself, so the 503 case takes seconds.
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "503" else c for c in GET_FAULTS])
def test_object_get_fault_holds_delivery_until_it_clears(pipeline: Pipeline, case: str) -> None:
    job_id, worker = submitted(pipeline)
    output = pipeline.output_bytes()
    fault, pattern = GET_FAULTS[case]
    expected = pattern(len(output), crc64ecma(output))
    active = pipeline.sandbox.faults.add(fault)

    attempt(pipeline, worker)  # verified, then one fetch for both deliveries
    view = pipeline.ledger.views.show_job(job_id).to_dict()
    assert view["status"] == "verified"
    for delivery in view["deliveries"]:
        assert (delivery["status"], delivery["attempts"]) == ("pending", 1)
        assert re.match(expected, delivery["last_error"]), delivery["last_error"]
    assert_nothing_forwarded(pipeline)

    # While the fault lasts, retries (each delivery on its own backoff now) meet it again.
    fired = active.fired
    attempt(pipeline, worker)
    assert active.fired > fired
    for delivery in pipeline.ledger.views.show_job(job_id).to_dict()["deliveries"]:
        assert delivery["status"] == "pending"
        assert re.match(expected, delivery["last_error"]), delivery["last_error"]
    assert_nothing_forwarded(pipeline)

    pipeline.sandbox.faults.clear()
    assert pipeline.drain(worker, job_id, DONE) == "delivered"
    assert_delivered_intact(pipeline, job_id)


@pytest.mark.slow
def test_slow_object_get_times_out_then_slow_enough_is_delivered(pipeline: Pipeline) -> None:
    job_id, worker = submitted(pipeline)
    settings = pipeline.settings

    def client_timeout(seconds: float) -> None:
        worker.pipeline.client_for_region = lambda region: make_client(
            settings.secret_id, settings.secret_key, region, settings.cos_endpoint, timeout=seconds
        )

    # The product's deadline is 30 s; a shorter one keeps the test short and exercises the same
    # path. The GETs are held far longer than it waits.
    client_timeout(0.5)
    pipeline.sandbox.faults.add(Fault(kind="object GET", delay=600))

    attempt(pipeline, worker)
    view = pipeline.ledger.views.show_job(job_id).to_dict()
    for delivery in view["deliveries"]:
        assert (delivery["status"], delivery["attempts"]) == ("pending", 1)
        assert delivery["last_error"] == "COS GetObject out/denoised.wav: no complete answer within 0.5s (deadline)"
    assert_nothing_forwarded(pipeline)

    # Slow, but within the client's timeout: not an error at all. The GET is held until the test
    # has seen it arrive and waited longer than the timeout above, then answered.
    pipeline.sandbox.faults.clear()
    client_timeout(30)
    held = pipeline.sandbox.faults.add(Fault(kind="object GET", delay=600))
    retrying = threading.Thread(target=attempt, args=(pipeline, worker))
    retrying.start()
    try:
        pipeline.wait_until(lambda: held.fired >= 1, what="the retry's object GET")
        retrying.join(timeout=1.0)  # twice the timeout that failed above
        assert retrying.is_alive(), "the retry ended while its GET was held"
    finally:
        pipeline.sandbox.faults.clear()  # answers the held GET now
        retrying.join(timeout=60)
    assert not retrying.is_alive()
    assert pipeline.drain(worker, job_id, DONE) == "delivered"
    assert [d["attempts"] for d in pipeline.ledger.views.show_job(job_id).to_dict()["deliveries"]] == [2, 2]
    assert_delivered_intact(pipeline, job_id)


# --- CI: DescribeMediaJob ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        pytest.param(
            Fault(kind="CI describe", status=503),
            re.escape("CI answered 503 ServiceUnavailable"),
            marks=pytest.mark.slow,
        ),
        (
            Fault(kind="CI describe", reset=10),
            r"CI API unreachable: \(.Connection broken: ConnectionResetError\(104, ",
        ),
    ],
    ids=["503", "reset"],
)
def test_describe_fault_retries_verification_until_it_clears(pipeline: Pipeline, fault: Fault, error: str) -> None:
    active = pipeline.sandbox.faults.add(fault)
    job_id = pipeline.submit(pipeline.upload_input())
    pipeline.wait_until(lambda: pipeline.status(job_id) == "received", what="the callback")
    worker = pipeline.worker()

    for tries in (1, 2):
        attempt(pipeline, worker)
        view = pipeline.ledger.views.show_job(job_id).to_dict()
        assert view["status"] == "received"
        (verify,) = view["verify"]
        assert (verify["status"], verify["attempts"]) == ("pending", tries)
        assert re.match(error, verify["last_error"]), verify["last_error"]
        assert view["deliveries"] == []
    assert active.fired >= 2
    assert_nothing_forwarded(pipeline)

    pipeline.sandbox.faults.clear()
    assert pipeline.drain(worker, job_id, DONE) == "delivered"
    assert pipeline.ledger.views.show_job(job_id).to_dict()["verify"][0]["attempts"] == 3
    assert_delivered_intact(pipeline, job_id)


# --- the ledger database -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_postgres_outage_is_answered_503_and_waited_out(pipeline: Pipeline, database_url: str, tmp_path: Path) -> None:
    """The real deployment (gunicorn from the Procfile, a worker process) with PostgreSQL behind a proxy."""
    with proxied_database(database_url) as (proxy, proxied):
        env = settings_env(pipeline.settings) | {"WEBHOOK_DATABASE_URL": proxied}
        web_log, worker_log = tmp_path / "web.log", tmp_path / "worker.log"
        with web(env, web_log) as (url, proc):
            wait_healthy(url, proc, web_log)
            worker = start_worker(env, worker_log)
            try:
                pipeline.wait_until(lambda: " started " in worker_log.read_text(), what="the worker")
                proxy.down()

                # CI's own attempts (the sandbox retries three times) are all refused.
                job_id = pipeline.submit(pipeline.upload_input(), callback_url=f"{url}/callback/{TOKEN}")
                (sent,) = pipeline.sandbox.wait_for_callbacks(1, timeout=20)
                assert (sent.status_code, sent.attempts) == (503, 4)
                refused = requests.post(f"{url}/callback/{TOKEN}", data=sent.body, timeout=10)
                assert refused.status_code == 503
                assert refused.json() == {"error": "ledger unavailable, retry later", "status": 503}
                assert refused.headers["Retry-After"] == "30"
                assert requests.get(f"{url}/healthz", timeout=10).status_code == 503
                assert pipeline.status(job_id) == ""  # nothing stored, nothing claimed to be
                pipeline.wait_until(
                    lambda: "ledger unavailable (" in worker_log.read_text(), what="the worker to meet the outage"
                )
                assert worker.poll() is None, worker_log.read_text()

                proxy.up()
                accepted = requests.post(f"{url}/callback/{TOKEN}", data=sent.body, timeout=10)
                assert accepted.status_code == 200, accepted.text
                assert accepted.json()["jobs"] == [{"job_id": job_id, "duplicate": False}]
                pipeline.wait_until(lambda: pipeline.status(job_id) == "delivered", timeout=30, what="delivery")
                assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
                assert worker.poll() is None, worker_log.read_text()
            finally:
                worker.terminate()
                worker.wait(timeout=20)
    assert worker.returncode == 0, worker_log.read_text()
    assert "ledger reachable again after" in worker_log.read_text()
    assert "ledger unavailable; callback not stored" in web_log.read_text()
    assert "/callback/<token> 500" not in web_log.read_text()
    assert_delivered_intact(pipeline, job_id)
