"""Several worker processes on one host: with one WEBHOOK_WORKER_METRICS_PORT one of them serves the
sum of all of them, another takes the port over when it stops, and a port held by another program
costs the worker its scrape only (one log record naming the variable), never its work; a job's
download staged by one is delivered by another."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from support.pipeline import Pipeline, settings_env
from support.processes import free_port, start_worker
from support.receiver import Reply
from test_metrics import scrape, value

from webhook.dev.sandbox import Fault
from webhook.ledger import utcnow
from webhook.ledger.schema import tasks

pytestmark = pytest.mark.slow  # worker processes


@contextmanager
def workers(env: dict[str, str], *logs: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        for log in logs:
            started.append(start_worker(env, log))
        yield started
    finally:
        for proc in started:
            proc.terminate()
        for proc in started:
            proc.wait(timeout=30)


def serves(url: str) -> bool:
    try:
        return requests.get(f"{url}/livez", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def worker_env(pipeline: Pipeline, port: int, tmp_path: Path) -> dict[str, str]:
    return settings_env(pipeline.settings) | {
        "WEBHOOK_WORKER_METRICS_PORT": str(port),
        "WEBHOOK_WORKER_METRICS_DIR": str(tmp_path / "worker-metrics"),
        "WEBHOOK_HEARTBEAT_SECONDS": "1",
    }


def test_two_workers_share_one_port_and_the_other_takes_it_over(pipeline: Pipeline, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    env = worker_env(pipeline, port, tmp_path)

    def deliver_one(name: str) -> None:
        job_id = pipeline.submit(pipeline.upload_input(f"in/{name}.wav"))
        pipeline.wait_until(lambda: pipeline.status(job_id) == "delivered", timeout=60, what=f"delivery of {name}")

    with workers(env, first_log) as procs:
        pipeline.wait_until(lambda: serves(url), what="the first worker's metrics port")
        deliver_one("by-the-first")  # the only worker: this count is in the first's files
        procs.append(start_worker(env, second_log))
        pipeline.wait_until(
            lambda: "served by another worker of this host" in second_log.read_text(), what="the second's log line"
        )
        deliver_one("by-either")
        assert value(scrape(url), "cos_webhook_verifications_total", outcome="ok") == 2

        procs[0].terminate()  # the one serving: the other takes the port over
        assert procs[0].wait(timeout=30) == 0
        pipeline.wait_until(lambda: serves(url), timeout=30, what="the second worker taking the port over")
        deliver_one("by-the-second")  # the only worker left
        summed = scrape(url)
    assert value(summed, "cos_webhook_verifications_total", outcome="ok") == 3  # the first's counts kept
    assert value(summed, "cos_webhook_deliveries_total", sink="filesystem", outcome="ok") == 3
    assert procs[1].returncode == 0, second_log.read_text()
    assert f"metrics on port {port}: /metrics" in second_log.read_text()
    assert all(" ERROR " not in line for line in (first_log.read_text() + second_log.read_text()).splitlines())


def test_a_port_another_program_holds_is_logged_once_and_the_worker_works_on(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    with socket.create_server(("0.0.0.0", 0)) as squatter:
        port = squatter.getsockname()[1]
        with workers(worker_env(pipeline, port, tmp_path) | {"WEBHOOK_LOG_FORMAT": "text"}, log) as procs:
            job_id = pipeline.submit(pipeline.upload_input())
            pipeline.wait_until(lambda: pipeline.status(job_id) == "delivered", timeout=60, what="delivery")
            assert procs[0].poll() is None
    errors = [line for line in log.read_text().splitlines() if " ERROR " in line]
    assert len(errors) == 1, log.read_text()
    assert f"WEBHOOK_WORKER_METRICS_PORT={port} is taken by another program" in errors[0]
    assert procs[0].returncode == 0


def test_a_retry_in_another_worker_process_delivers_the_download_the_first_staged(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """Fetched once per job holds across the worker processes of a host (one WEBHOOK_TEMP_DIR)."""
    gets = pipeline.sandbox.faults.add(Fault(kind="object GET", path="/out/*", delay=0.001))  # counts GETs
    pipeline.http.reply(Reply(503), Reply(200))  # the first http delivery fails
    # ... and is not due again while the first worker runs (an hour's backoff).
    slow = {"WEBHOOK_BACKOFF_BASE": "3600", "WEBHOOK_BACKOFF_CAP": "3600"}
    env = settings_env(pipeline.settings) | slow | {"WEBHOOK_TEMP_DIR": str(tmp_path / "staging")}
    job_id = pipeline.submit(pipeline.upload_input())
    with workers(env, tmp_path / "first.log") as first:
        pipeline.wait_until(lambda: len(pipeline.http.requests) == 1, timeout=60, what="the first http attempt")
        first[0].terminate()
        assert first[0].wait(timeout=30) == 0
    assert pipeline.status(job_id) == "verified"
    with pipeline.ledger.engine.begin() as conn:  # the retry is due now, for the second worker
        conn.execute(tasks.update().where(tasks.c.job_id == job_id).values(run_after=utcnow()))
    with workers(env, tmp_path / "second.log"):
        pipeline.wait_until(lambda: pipeline.status(job_id) == "delivered", timeout=60, what="the retry")
    assert gets.fired == 1
    assert "reusing the staged download of out/denoised.wav" in (tmp_path / "second.log").read_text()
