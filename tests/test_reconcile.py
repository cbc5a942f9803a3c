"""Reconcile: jobs whose callback never came are found through CI's job list, recorded and delivered."""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from support.logs import records
from support.pipeline import BUCKET, DONE, REGION, Pipeline, multipart_file, settings_env, working
from support.processes import start_worker
from support.receiver import Receiver

from webhook.ci.listing import Listed, creation_time
from webhook.cli import main
from webhook.config import ConfigError, Settings
from webhook.dev.sandbox import Fault
from webhook.intake.callback import parse_job
from webhook.intake.reconcile import (
    LOCK,
    RUNTIME_MARGIN,
    PeriodicReconcile,
    Summary,
    reconcile,
    to_record,
)
from webhook.ledger import Ledger, utcnow
from webhook.ledger.schema import callbacks, locks

FINISHED = "Success,Failed,Cancel"


@pytest.fixture
def lost_url() -> str:
    """A callback URL nobody listens on: a receiver's, after it stopped."""
    receiver = Receiver().start()
    url = receiver.url + "callback"
    receiver.stop()
    return url


def submit_lost(pipeline: Pipeline, lost_url: str, n: int) -> list[str]:
    """``n`` jobs whose callbacks go nowhere; their ids, in the order they were submitted."""
    input_key = pipeline.upload_input(seconds=0.2)
    return [pipeline.submit(input_key, output_key=f"out/{i}.wav", callback_url=lost_url) for i in range(n)]


def wait_finished(pipeline: Pipeline, n: int) -> None:
    client = pipeline.sandbox.client(REGION)

    def finished() -> int:
        return len(
            client.ci_list_media_jobs(Bucket=BUCKET, Tag="NoiseReduction", States=FINISHED, Size=100).get(
                "JobsDetail", []
            )
        )

    pipeline.wait_until(lambda: finished() >= n, what=f"{n} finished jobs")


def run_reconcile(pipeline: Pipeline) -> dict[str, object]:
    summary: Summary = reconcile(pipeline.settings, pipeline.ledger, utcnow() - timedelta(hours=24))
    return summary.to_dict()


def cli(pipeline: Pipeline, *args: str, **env: str) -> Result:
    return CliRunner().invoke(main, ["reconcile", *args], env=settings_env(pipeline.settings) | env)


@pytest.mark.slow
def test_lost_callbacks_are_found_recorded_and_delivered_once(
    pipeline: Pipeline, lost_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = submit_lost(pipeline, lost_url, 40)
    wait_finished(pipeline, 40)
    monkeypatch.setattr("webhook.ci.listing.PAGE_SIZE", 7)  # 40 jobs take six pages: NextToken is followed

    said: list[str] = []
    found = reconcile(pipeline.settings, pipeline.ledger, utcnow() - timedelta(hours=24), said.append).to_dict()

    assert (found["listed"], found["already_known"], found["recorded"]) == (40, 0, ids)
    # A long run says where it is: after each page listed, after each job recorded.
    pages = [f"{BUCKET}: {n} jobs listed" for n in (7, 14, 21, 28, 35, 40)]
    assert [line for line in said if "jobs listed" in line] == pages
    assert said[-1] == f"{BUCKET}: 40 listed, 40/40 recorded"
    assert len(said) == 6 + 40
    assert [pipeline.status(job_id) for job_id in ids] == ["received"] * 40
    worker = pipeline.worker()
    try:
        assert {pipeline.drain(worker, job_id, DONE) for job_id in ids} == {"delivered"}
    finally:
        worker.close()
    for i, job_id in enumerate(ids):
        assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == pipeline.output_bytes(f"out/{i}.wav")
    with pipeline.ledger.engine.connect() as conn:
        stored = conn.execute(sa.select(callbacks.c.remote_addr, callbacks.c.headers, callbacks.c.body)).all()
    assert {(addr, json.loads(headers)["X-Found-By"]) for addr, headers, _ in stored} == {("reconcile", "reconcile")}
    assert sorted(json.loads(body)["JobId"] for _, _, body in stored) == sorted(ids)
    assert all(sent.status_code is None for sent in pipeline.sandbox.callbacks_sent)

    again = run_reconcile(pipeline)

    assert (again["listed"], again["already_known"], again["recorded"]) == (40, 40, [])
    assert len(pipeline.http.requests) == 40


def test_reconciles_running_at_once_store_one_callback_per_job(
    pipeline: Pipeline, lost_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = submit_lost(pipeline, lost_url, 6)
    wait_finished(pipeline, 6)
    runs = 4
    # Every run has looked the jobs up, and found none, before any run records: the race of the
    # CLI's reconcile with a worker's, every time rather than now and then.
    looked_up = threading.Barrier(runs, timeout=30)
    known = pipeline.ledger.jobs.known

    def known_then_wait(job_ids: list[str]) -> set[str]:
        found = known(job_ids)
        looked_up.wait()
        return found

    monkeypatch.setattr(pipeline.ledger.jobs, "known", known_then_wait)
    with ThreadPoolExecutor(runs) as pool:
        found = list(pool.map(lambda _: run_reconcile(pipeline), range(runs)))

    assert [f["already_known"] for f in found] == [0] * runs
    assert sorted(job_id for f in found for job_id in f["recorded"]) == sorted(ids)  # type: ignore[attr-defined]
    with pipeline.ledger.engine.connect() as conn:
        bodies = conn.execute(sa.select(callbacks.c.body)).scalars().all()
    assert len(bodies) == len(ids)  # one callback row per job, not one per job and run
    assert sorted(json.loads(body)["JobId"] for body in bodies) == sorted(ids)
    assert [pipeline.status(job_id) for job_id in ids] == ["received"] * 6


@pytest.mark.slow
@pytest.mark.parametrize("sandbox", [1.0], indirect=True)
def test_a_running_job_is_left_until_a_later_reconcile_finds_it_finished(pipeline: Pipeline, lost_url: str) -> None:
    [job_id] = submit_lost(pipeline, lost_url, 1)

    early = run_reconcile(pipeline)

    assert (early["listed"], early["recorded"]) == (0, [])
    assert pipeline.status(job_id) == ""

    wait_finished(pipeline, 1)
    late = run_reconcile(pipeline)

    assert late["recorded"] == [job_id]
    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"


def test_queue_ids_restrict_the_listing(pipeline: Pipeline, lost_url: str) -> None:
    [job_id] = submit_lost(pipeline, lost_url, 1)
    wait_finished(pipeline, 1)
    queue_id = pipeline.sandbox.client(REGION).ci_get_media_jobs(Bucket=BUCKET, JobIDs=job_id)["JobsDetail"][0][
        "QueueId"
    ]
    since = utcnow() - timedelta(hours=1)

    elsewhere = reconcile(pipeline.settings.replace(reconcile_queue_ids=("p" + "0" * 32,)), pipeline.ledger, since)
    mine = reconcile(pipeline.settings.replace(reconcile_queue_ids=("p" + "0" * 32, queue_id)), pipeline.ledger, since)

    assert (elsewhere.to_dict()["listed"], elsewhere.to_dict()["recorded"]) == (0, [])
    assert mine.to_dict()["recorded"] == [job_id]


def test_cli_json_summary_then_text(pipeline: Pipeline, lost_url: str) -> None:
    ids = submit_lost(pipeline, lost_url, 2)
    wait_finished(pipeline, 2)

    first = cli(pipeline, "--json", "--since", "1h")

    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary == {
        "since": summary["since"],
        "listed": 2,
        "already_known": 0,
        "recorded": ids,
        "buckets": [{"bucket": BUCKET, "region": REGION, "listed": 2, "already_known": 0, "recorded": ids}],
    }
    # UTC, marked, like every time the commands print; CI alone is asked in its own +0800.
    since = datetime.strptime(summary["since"], "%Y-%m-%dT%H:%M:%S%z")
    assert summary["since"].endswith("Z")
    assert datetime.now(UTC) - timedelta(minutes=61) < since < datetime.now(UTC) - timedelta(minutes=59)

    second = cli(pipeline)

    assert second.exit_code == 0, second.output
    [line] = second.stdout.splitlines()
    assert re.fullmatch(
        rf"reconcile since \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ: 2 finished jobs listed, 2 already known, "
        rf"0 recorded \({BUCKET}: 2 listed, 2 known, 0 recorded\)",
        line,
    )


def test_cli_prints_one_line_per_recorded_job_and_a_summary(pipeline: Pipeline, lost_url: str) -> None:
    [job_id] = submit_lost(pipeline, lost_url, 1)
    wait_finished(pipeline, 1)

    result = cli(pipeline, "--since", "2h")

    assert result.exit_code == 0, result.output
    recorded, summary = result.stdout.splitlines()
    assert recorded == f"recorded {job_id} ({BUCKET})"
    assert summary.endswith(
        f"1 finished jobs listed, 0 already known, 1 recorded ({BUCKET}: 1 listed, 0 known, 1 recorded)"
    )


def test_cli_wrong_secret_key_names_the_bucket_and_the_error(pipeline: Pipeline) -> None:
    result = cli(pipeline, COS_SECRET_KEY="not-the-sandbox-key")

    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"Error: bucket {BUCKET}: CI answered 403 SignatureDoesNotMatch: ")
    assert "not-the-sandbox-key" not in result.output


def test_to_record_keeps_finished_jobs_the_ledger_lacks_once_each() -> None:
    def listed(job_id: str, state: str) -> Listed:
        detail = {"JobId": job_id, "Tag": "NoiseReduction", "State": state, "Operation": {}}
        return Listed(parse_job(detail, "test"), detail)

    page = [
        listed("jnew", "Success"),
        listed("jfailed", "Failed"),
        listed("jknown", "Success"),
        listed("jrunning", "Running"),
        listed("jnew", "Success"),  # pages can overlap
        listed("jcancelled", "Cancel"),
    ]

    assert [item.job.job_id for item in to_record(page, {"jknown"})] == ["jnew", "jfailed", "jcancelled"]


def test_creation_time_is_written_as_the_api_takes_it() -> None:
    assert creation_time(datetime(2024, 5, 1, 2, 3, 4)) == "2024-05-01T10:03:04+0800"
    assert creation_time(datetime(2024, 5, 1, 23, 0, 0, tzinfo=UTC)) == "2024-05-02T07:00:00+0800"


def test_reconcile_settings_come_from_the_environment() -> None:
    settings = Settings.from_env({"WEBHOOK_RECONCILE_QUEUE_IDS": "pa1, pb2,", "WEBHOOK_RECONCILE_INTERVAL": "300"})
    defaults = Settings.from_env({})

    assert (settings.reconcile_queue_ids, settings.reconcile_interval) == (("pa1", "pb2"), 300.0)
    assert (defaults.reconcile_queue_ids, defaults.reconcile_interval) == ((), 600.0)
    with pytest.raises(ConfigError, match="WEBHOOK_RECONCILE_INTERVAL must be greater than 0"):
        Settings.from_env({"WEBHOOK_RECONCILE_INTERVAL": "0"})


# -- the worker's own reconcile ----------------------------------------------------------------

INTERVAL = 60.0  # long enough that a lock taken in a test holds until it ends


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def periodic(pipeline: Pipeline, holder: str, clock: Clock, interval: float = INTERVAL) -> PeriodicReconcile:
    return PeriodicReconcile(pipeline.settings.replace(reconcile_interval=interval), pipeline.ledger, holder, clock)


def ran(summary: Summary | None) -> dict[str, object]:
    """What a tick that ran found."""
    assert summary is not None, "the tick did not run"
    return summary.to_dict()


def count_ci_lists(pipeline: Pipeline) -> Callable[[], int]:
    """How many DescribeMediaJobs requests the sandbox has answered from now on."""
    counting = pipeline.sandbox.faults.add(Fault(kind="CI list", delay=0.001))  # an effect it must have
    return lambda: counting.fired


def count_statements(ledger: Ledger) -> Callable[[], int]:
    """How many statements the ledger has sent its database from now on."""
    sent = [0]

    def count(*_: object) -> None:
        sent[0] += 1

    sa.event.listen(ledger.engine, "before_cursor_execute", count)
    return lambda: sent[0]


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "webhook.intake.reconcile" and r.levelno >= logging.WARNING
    ]


def test_two_workers_ticking_together_run_once_per_interval(pipeline: Pipeline, lost_url: str) -> None:
    ids = submit_lost(pipeline, lost_url, 2)
    wait_finished(pipeline, 2)
    clock = Clock()
    a, b = periodic(pipeline, "worker-a", clock), periodic(pipeline, "worker-b", clock)
    start = threading.Barrier(2)

    def tick(reconciler: PeriodicReconcile) -> Summary | None:
        start.wait()
        return reconciler.tick()

    with ThreadPoolExecutor(2) as pool:
        first = list(pool.map(tick, (a, b)))

    [won] = [summary for summary in first if summary is not None]
    winner, loser = (a, b) if first[0] is not None else (b, a)
    assert won.to_dict()["recorded"] == ids
    assert (winner.runs, winner.recorded, loser.runs, loser.failures) == (1, 2, 0, 0)

    clock.now += INTERVAL  # both due again: the winner's lock still holds the other off
    assert loser.tick() is None
    assert ran(winner.tick())["recorded"] == []

    # The winner stops; once its lock runs out the other takes over.
    with pipeline.ledger.engine.begin() as conn:
        conn.execute(locks.update().where(locks.c.name == LOCK).values(until=utcnow() - timedelta(seconds=1)))
    clock.now += INTERVAL
    assert loser.tick() is not None
    assert winner.tick() is None
    assert (winner.runs, loser.runs, winner.recorded + loser.recorded) == (2, 1, 2)
    assert pipeline.status(ids[0]) == "received"


def test_a_tick_before_the_interval_asks_neither_ci_nor_the_ledger(pipeline: Pipeline) -> None:
    clock = Clock()
    reconciler = periodic(pipeline, "worker-a", clock)
    ci_lists = count_ci_lists(pipeline)
    statements = count_statements(pipeline.ledger)

    assert reconciler.tick() is not None  # the first tick runs at once
    assert ci_lists() == 1
    ran = statements()

    clock.now += INTERVAL - 0.01
    assert reconciler.tick() is None
    assert (ci_lists(), statements()) == (1, ran)

    clock.now += 0.01
    assert reconciler.tick() is not None
    assert ci_lists() == 2
    assert reconciler.runs == 2


@pytest.mark.slow  # the SDK waits a second before its retry
def test_ci_failing_is_one_warning_and_the_next_interval_tries_again(
    pipeline: Pipeline, lost_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    [job_id] = submit_lost(pipeline, lost_url, 1)
    wait_finished(pipeline, 1)
    clock = Clock()
    reconciler = periodic(pipeline, "worker-a", clock)
    pipeline.sandbox.faults.add(Fault(kind="CI list", status=503))
    caplog.set_level(logging.INFO, logger="webhook.intake.reconcile")

    assert reconciler.tick() is None

    [warning] = warnings(caplog)
    assert warning.startswith(f"reconcile failed, next try in 60s: bucket {BUCKET}: CI answered 503 ")
    assert (reconciler.runs, reconciler.failures) == (0, 1)
    clock.now += INTERVAL / 2
    assert reconciler.tick() is None  # not due yet: a failure does not make it try sooner
    assert len(warnings(caplog)) == 1

    pipeline.sandbox.faults.clear()
    clock.now += INTERVAL / 2
    summary = ran(reconciler.tick())

    assert summary["recorded"] == [job_id]
    assert (reconciler.runs, reconciler.recorded, reconciler.failures) == (1, 1, 1)
    assert len(warnings(caplog)) == 1
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reconcile since=")]
    assert line.endswith(f" listed=1 known=0 recorded=1 jobs={job_id}")


def test_a_ledger_away_is_one_warning_not_an_exception(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'missing' / 'ledger.db'}")  # its directory does not exist
    reconciler = PeriodicReconcile(Settings(reconcile_interval=5), ledger, "worker-a", Clock())
    caplog.set_level(logging.INFO, logger="webhook.intake.reconcile")

    assert reconciler.tick() is None

    assert warnings(caplog) == ["reconcile failed, next try in 5s: ledger unavailable (OperationalError)"]
    assert reconciler.failures == 1
    ledger.dispose()


def test_each_run_lists_two_intervals_and_the_margin_back(pipeline: Pipeline) -> None:
    reconciler = periodic(pipeline, "worker-a", Clock(), interval=600)
    now = datetime(2024, 5, 1, 12, 0, 0)

    assert reconciler.window(now) == now - timedelta(seconds=1200 + RUNTIME_MARGIN)


def test_a_slow_ci_listing_does_not_hold_up_claiming(pipeline: Pipeline) -> None:
    # The worker's first reconcile starts at once and its listing hangs; claiming goes on beside it.
    hanging = pipeline.sandbox.faults.add(Fault(kind="CI list", delay=120))
    job_id = pipeline.submit(pipeline.upload_input())
    with working(pipeline.settings, pipeline.ledger) as worker:
        pipeline.wait_until(lambda: hanging.fired == 1, what="the worker's reconcile to list")
        pipeline.wait_until(lambda: pipeline.status(job_id) in DONE, what="the job to be delivered")
        assert pipeline.status(job_id) == "delivered"
        assert (worker.reconciler.runs, worker.reconciler.failures) == (0, 0)  # still listing
        pipeline.sandbox.faults.clear()  # ends the listing, so the worker can stop
    assert worker.reconciler.runs == 1


def test_a_burst_delivers_what_its_reconcile_finds(pipeline: Pipeline, lost_url: str) -> None:
    ids = submit_lost(pipeline, lost_url, 2)
    wait_finished(pipeline, 2)
    worker = pipeline.worker()
    try:
        assert worker.run(burst=True) == 2
    finally:
        worker.close()

    assert worker.reconciler.recorded == 2
    assert [pipeline.status(job_id) for job_id in ids] == ["delivered", "delivered"]


@pytest.mark.slow
def test_forty_lost_callbacks_are_delivered_after_ticks_and_worker_runs(pipeline: Pipeline, lost_url: str) -> None:
    ids = submit_lost(pipeline, lost_url, 40)
    clock = Clock()
    reconciler = periodic(pipeline, "reconciler", clock)
    worker = pipeline.worker()
    try:
        while reconciler.recorded < 40 or {pipeline.status(job_id) for job_id in ids} != {"delivered"}:
            assert clock.now < 1000 + 200 * INTERVAL, {job_id: pipeline.status(job_id) for job_id in ids}
            reconciler.tick()
            worker.run(burst=True)
            clock.now += INTERVAL
    finally:
        worker.close()

    assert (reconciler.recorded, reconciler.failures) == (40, 0)
    for i, job_id in enumerate(ids):
        assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == pipeline.output_bytes(f"out/{i}.wav")
    assert sorted(multipart_file(r)[0]["job"]["job_id"] for r in pipeline.http.requests) == sorted(ids)


@pytest.mark.slow
@pytest.mark.parametrize("sandbox", [1.0], indirect=True)
def test_a_job_running_at_one_tick_is_recorded_by_a_later_one(pipeline: Pipeline, lost_url: str) -> None:
    clock = Clock()
    reconciler = periodic(pipeline, "worker-a", clock)
    [job_id] = submit_lost(pipeline, lost_url, 1)

    early = ran(reconciler.tick())

    assert (early["listed"], early["recorded"]) == (0, [])
    wait_finished(pipeline, 1)
    clock.now += INTERVAL
    late = ran(reconciler.tick())

    assert late["recorded"] == [job_id]
    assert (reconciler.runs, reconciler.recorded) == (2, 1)
    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"


@pytest.mark.slow
def test_worker_processes_reconcile_on_their_own(pipeline: Pipeline, lost_url: str, tmp_path: Path) -> None:
    ids = submit_lost(pipeline, lost_url, 40)
    env = settings_env(pipeline.settings) | {"WEBHOOK_RECONCILE_INTERVAL": "1"}
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    workers = [start_worker(env, log) for log in logs]
    try:
        pipeline.wait_until(
            lambda: {pipeline.status(job_id) for job_id in ids} == {"delivered"}, timeout=60, what="40 deliveries"
        )
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        codes = [worker.wait(timeout=30) for worker in workers]
    assert codes == [0, 0], [log.read_text() for log in logs]

    assert len(pipeline.http.requests) == 40
    lines = [line for log in logs for line in records(log.read_text())]
    runs = [
        m
        for line in lines
        if (m := re.search(r" INFO webhook\.intake\.reconcile reconcile since=\S+ .* recorded=(\d+) ", line))
    ]
    assert sum(int(m[1]) for m in runs) == 40
