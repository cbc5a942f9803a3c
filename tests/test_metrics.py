"""Prometheus metrics: what is counted, the ledger's gauges and their cache, who may read them,
gunicorn's processes summed, and a worker process serving its own."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from support.endpoint import TOKEN
from support.pipeline import DONE, Pipeline, settings_env
from support.processes import free_port, start_worker, wait_healthy, web
from support.receiver import Reply
from support.samples import DOC_JSON, JOB_ID, body, job

from webhook.config import Settings
from webhook.intake.callback import parse_callback
from webhook.intake.triage import triage
from webhook.ledger import DeliveryClaim, Ledger, LedgerStats, LedgerUnavailable, RawRequest, TaskGroup, VerifyClaim
from webhook.ledger.schema import tasks, workers
from webhook.models import JobStatus, job_from_json
from webhook.telemetry import metrics, metrics_dir
from webhook.web.app import create_app
from webhook.web.server import BackgroundServer

EXPECTED = {
    "cos_webhook_callbacks": "counter",
    "cos_webhook_verifications": "counter",
    "cos_webhook_deliveries": "counter",
    "cos_webhook_capped_versions": "counter",
    "cos_webhook_ack_seconds": "histogram",
    "cos_webhook_step_seconds": "histogram",
    "cos_webhook_delivery_latency_seconds": "histogram",
    "cos_webhook_jobs": "gauge",
    "cos_webhook_tasks_due": "gauge",
    "cos_webhook_task_lag_seconds": "gauge",
    "cos_webhook_dead": "gauge",
    "cos_webhook_workers": "gauge",
    "cos_webhook_sink_breaker": "gauge",
    "cos_webhook_sink_paused_deliveries": "gauge",
}
METRICS_TOKEN = "scrape-0123456789abcdef"
IGNORED_BODY = body("json", job("j00000000000000000000000000000ign", Tag="VoiceSeparate"))


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, **headers: str) -> Samples:
    """Every sample of ``url``/metrics, after checking each expected metric is described."""
    response = requests.get(f"{url}/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    for name, kind in EXPECTED.items():
        assert name in families, f"{name} is not exposed"
        assert (families[name].type, bool(families[name].documentation)) == (kind, True), name
        exposed = f"{name}_total" if kind == "counter" else name
        assert f"# HELP {exposed} " in response.text
        assert f"# TYPE {exposed} {kind}\n" in response.text
    return {(s.name, frozenset(s.labels.items())): s.value for family in families.values() for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def labelled(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(key)[label]: v for (sample, key), v in samples.items() if sample == name}


@contextmanager
def receiver(ledger: Ledger, **changes: Any) -> Iterator[str]:
    settings = Settings(database_url=ledger.url, callback_tokens=(TOKEN,), **changes)
    with BackgroundServer(create_app(settings, ledger)) as server:
        yield server.url


def post(url: str, data: bytes, token: str = TOKEN) -> int:
    return requests.post(f"{url}/callback/{token}", data=data, timeout=30).status_code


# -- what is exposed and counted -------------------------------------------------------------------------


def test_every_metric_is_described_and_every_job_status_is_present(ledger: Ledger) -> None:
    with receiver(ledger) as url:
        samples = scrape(url)

    assert labelled(samples, "cos_webhook_jobs", "status") == {status.value: 0 for status in JobStatus}
    assert value(samples, "cos_webhook_tasks_due", kind="verify", sink="") == 0
    assert value(samples, "cos_webhook_workers") == 0


def test_callbacks_are_counted_by_outcome_and_timed(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "RENDER_CACHE_SECONDS", 0.0)  # scraped again within a second: rendered again
    with receiver(ledger) as url:
        before = scrape(url)
        assert post(url, DOC_JSON) == 200
        assert post(url, DOC_JSON) == 200
        assert post(url, IGNORED_BODY) == 200
        assert post(url, b"<Response/>") == 400
        assert post(url, DOC_JSON, token="cb-not-the-token-at-all") == 404
        after = scrape(url)

    def moved(outcome: str) -> float:
        return value(after, "cos_webhook_callbacks_total", outcome=outcome) - value(
            before, "cos_webhook_callbacks_total", outcome=outcome
        )

    assert {o.value: moved(o.value) for o in metrics.CallbackOutcome} == {
        "stored": 1,
        "duplicate": 1,
        "ignored": 1,
        "refused_4xx": 2,
        "unavailable_503": 0,
        "error_5xx": 0,
    }
    assert value(after, "cos_webhook_ack_seconds_count") - value(before, "cos_webhook_ack_seconds_count") == 5


def test_versions_past_the_cap_are_answered_200_and_counted(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "RENDER_CACHE_SECONDS", 0.0)  # scraped again within a second: rendered again
    said_again = DOC_JSON.replace(b"This is my NoiseReduction job.", b"said again")
    with receiver(ledger, max_versions_per_job=1) as url:
        before = scrape(url)
        assert post(url, DOC_JSON) == 200
        answered = requests.post(f"{url}/callback/{TOKEN}", data=said_again, timeout=30)
        after = scrape(url)

    assert answered.status_code == 200  # CI must not send it again: it is stored
    assert answered.json()["capped"] == [JOB_ID]
    assert answered.json()["jobs"] == [{"job_id": JOB_ID, "duplicate": True}]
    moved = value(after, "cos_webhook_capped_versions_total") - value(before, "cos_webhook_capped_versions_total")
    assert moved == 1
    assert (
        value(after, "cos_webhook_callbacks_total", outcome="duplicate")
        - value(before, "cos_webhook_callbacks_total", outcome="duplicate")
        == 1
    )
    assert [v.status for v in ledger.views.show_job(JOB_ID).versions] == ["pending", "capped"]


def test_a_callback_the_ledger_cannot_store_is_counted_unavailable(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "RENDER_CACHE_SECONDS", 0.0)  # scraped again within a second: rendered again
    with receiver(ledger) as url:
        before = scrape(url)
        with ledger.engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE job_versions"))
        assert post(url, DOC_JSON) == 503
        after = scrape(url)
    outcome = {"outcome": "unavailable_503"}
    moved = value(after, "cos_webhook_callbacks_total", **outcome) - value(
        before, "cos_webhook_callbacks_total", **outcome
    )
    assert moved == 1


def test_a_pipeline_run_counts_verifications_steps_and_deliveries_per_sink(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "RENDER_CACHE_SECONDS", 0.0)  # scraped again within a second: rendered again
    pipeline.http.reply(Reply(503), Reply(200))  # the http sink's first delivery is retried
    before = scrape(pipeline.receiver_url)
    job_id = pipeline.submit(pipeline.upload_input())
    pipeline.sandbox.wait_for_callbacks(1, timeout=20)
    worker = pipeline.worker()
    try:
        assert pipeline.drain(worker, job_id, DONE) == "delivered"
    finally:
        worker.close()
    after = scrape(pipeline.receiver_url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("cos_webhook_verifications_total", outcome="ok") == 1
    assert moved("cos_webhook_deliveries_total", sink="filesystem", outcome="ok") == 1
    assert moved("cos_webhook_deliveries_total", sink="http", outcome="retry") == 1
    assert moved("cos_webhook_deliveries_total", sink="http", outcome="ok") == 1
    assert moved("cos_webhook_step_seconds_count", step="verify") == 1
    assert moved("cos_webhook_step_seconds_count", step="fetch") >= 1  # the retry delivers from the staged copy
    assert moved("cos_webhook_step_seconds_count", step="deliver") == 3
    assert moved("cos_webhook_delivery_latency_seconds_count", sink="filesystem") == 1
    assert moved("cos_webhook_delivery_latency_seconds_count", sink="http") == 1


def test_lag_is_the_age_of_the_oldest_due_task(ledger: Ledger) -> None:
    with receiver(ledger) as url:
        assert post(url, DOC_JSON) == 200
        _backdate_tasks(ledger, seconds=90)  # the verify task has waited 90 s for a worker
        samples = scrape(url)

    assert value(samples, "cos_webhook_tasks_due", kind="verify", sink="") == 1
    assert value(samples, "cos_webhook_task_lag_seconds", kind="verify", sink="") >= 90
    assert value(samples, "cos_webhook_dead", kind="verify", sink="") == 0


def _backdate_tasks(ledger: Ledger, seconds: float) -> None:
    with ledger.engine.begin() as conn:
        for task_id, run_after in conn.execute(sa.select(tasks.c.id, tasks.c.run_after)).all():
            conn.execute(
                tasks.update().where(tasks.c.id == task_id).values(run_after=run_after - timedelta(seconds=seconds))
            )


def record_job(ledger: Ledger, job_id: str) -> None:
    parsed = parse_callback(body("json", job(job_id)))
    raw = RawRequest(b"{}", "application/json", {}, "127.0.0.1")
    ledger.jobs.record(raw, parsed, triage(parsed, ("NoiseReduction",)))


def test_the_stats_snapshot_counts_due_leased_dead_and_live(ledger: Ledger) -> None:
    record_job(ledger, "j000000000000000000000000000000aa")
    verify = ledger.queue.claim("w1", 60)
    assert isinstance(verify, VerifyClaim)
    (version,) = verify.versions
    accepted = job_from_json(version.detail)
    deliveries = ledger.queue.accept_and_claim(verify, "w1", ["archive", "hook"], version, accepted, {}, (), 60)
    assert isinstance(deliveries, DeliveryClaim)
    archive, hook = deliveries.deliveries
    record_job(ledger, "j000000000000000000000000000000bb")
    assert isinstance(ledger.queue.claim("w2", 60), VerifyClaim)  # leased: in progress, not waiting
    ledger.queue.give_up(hook, "w1", "hook: refused")
    ledger.queue.retry_later(archive, "w1", "archive: busy", 0.0)
    record_job(ledger, "j000000000000000000000000000000cc")
    ledger.workers.beat("w1", "host", 1)
    ledger.workers.beat("w2", "host", 2)
    with ledger.engine.begin() as conn:  # w2 missed three heartbeats of 5 s
        conn.execute(workers.update().where(workers.c.id == "w2").values(heartbeat_at=datetime(2020, 1, 1)))

    stats = ledger.stats.snapshot(heartbeat_seconds=5)

    assert stats.jobs == dict.fromkeys((s.value for s in JobStatus), 0) | {"received": 2, "verified": 1}
    assert stats.due == {TaskGroup("deliver", "archive"): 1, TaskGroup("verify", ""): 1}
    assert set(stats.oldest_due_seconds) == set(stats.due)
    assert all(age >= 0 for age in stats.oldest_due_seconds.values())
    assert stats.dead == {TaskGroup("deliver", "hook"): 1}
    assert stats.groups == [TaskGroup("deliver", "archive"), TaskGroup("deliver", "hook"), TaskGroup("verify", "")]
    assert (sum(stats.due.values()), sum(stats.dead.values()), stats.live_workers) == (2, 1, 1)


# -- the ledger's gauges are cached ----------------------------------------------------------------------


@contextmanager
def statements(ledger: Ledger) -> Iterator[list[str]]:
    """Every statement run on the ledger's engine while the block runs."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    sa.event.listen(ledger.engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        sa.event.remove(ledger.engine, "before_cursor_execute", count)


def test_scrapes_within_the_cache_window_read_the_ledger_once(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "LEDGER_CACHE_SECONDS", 600.0)  # no scrape here outlives the window
    with statements(ledger) as one_read:
        ledger.stats.snapshot()
    with receiver(ledger) as url, statements(ledger) as during:
        with ThreadPoolExecutor(16) as pool:  # sixteen scrapers at once, as in the issue
            assert set(pool.map(lambda _: requests.get(f"{url}/metrics", timeout=30).status_code, range(16))) == {200}
        for _ in range(5):
            scrape(url)

    assert len(one_read) >= 4
    assert during == one_read


def test_the_cache_expires_and_a_failed_read_leaves_the_gauges_empty() -> None:
    now = [0.0]
    reads: list[float] = []
    fail = [False]

    def read() -> LedgerStats:
        reads.append(now[0])
        if fail[0]:
            raise LedgerUnavailable("OperationalError", "ledger away")
        return LedgerStats(
            taken_at=datetime(2026, 1, 1),
            jobs={"received": 2},
            due={},
            oldest_due_seconds={},
            dead={},
            live_workers=1,
        )

    collector = metrics.LedgerCollector(read, ttl=5.0, clock=lambda: now[0])
    for tick in (0.0, 1.0, 4.9):
        now[0] = tick
        assert collector.snapshot() is not None
    assert reads == [0.0]
    now[0], fail[0] = 5.0, True
    families = {family.name: family for family in collector.collect()}
    assert reads == [0.0, 5.0]
    assert set(families) == {
        "cos_webhook_jobs",
        "cos_webhook_tasks_due",
        "cos_webhook_task_lag_seconds",
        "cos_webhook_dead",
        "cos_webhook_workers",
        "cos_webhook_sink_breaker",
        "cos_webhook_sink_paused_deliveries",
    }
    assert all(not family.samples for family in families.values())
    now[0], fail[0] = 9.0, False
    assert collector.snapshot() is None  # the failure is cached too: an outage is not hammered
    now[0] = 10.0
    assert collector.snapshot() is not None
    assert reads == [0.0, 5.0, 10.0]


def test_scrapes_within_a_second_share_one_rendering() -> None:
    collected: list[int] = []

    class Collector:
        def collect(self) -> Iterator[GaugeMetricFamily]:
            collected.append(len(collected))
            yield GaugeMetricFamily("renderings", "How often the exposition was rendered.", value=len(collected))

    served = CollectorRegistry()
    served.register(Collector())
    now = [0.0]
    exposition = metrics.Exposition(served, ttl=1.0, clock=lambda: now[0])

    assert len({exposition.text() for _ in range(100)}) == 1
    now[0] = 0.99
    assert exposition.text().endswith(b"renderings 1.0\n")
    now[0] = 1.0
    assert exposition.text().endswith(b"renderings 2.0\n")
    assert len(collected) == 2


# -- who may read them --------------------------------------------------------------------------------


def test_metrics_are_open_when_neither_setting_is_made(ledger: Ledger) -> None:
    with receiver(ledger) as url:
        assert requests.get(f"{url}/metrics", timeout=30).status_code == 200


def test_the_metrics_token_is_required_when_set(ledger: Ledger) -> None:
    with receiver(ledger, metrics_token=METRICS_TOKEN) as url:
        refused = requests.get(f"{url}/metrics", timeout=30)
        wrong = requests.get(f"{url}/metrics", headers={"Authorization": "Bearer nope"}, timeout=30)
        basic = requests.get(f"{url}/metrics", headers={"Authorization": f"Basic {METRICS_TOKEN}"}, timeout=30)
        scrape(url, Authorization=f"Bearer {METRICS_TOKEN}")

    for response in (refused, wrong, basic):
        assert response.status_code == 403
        assert response.json() == {"error": "metrics need Authorization: Bearer <WEBHOOK_METRICS_TOKEN>", "status": 403}


def test_the_source_allowlist_guards_metrics_and_the_token_opens_them_from_elsewhere(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "RENDER_CACHE_SECONDS", 0.0)  # scraped again within a second: rendered again
    elsewhere = (ipaddress.ip_network("10.0.0.0/8"),)
    with receiver(ledger, allowed_sources=elsewhere) as url:
        refused = requests.get(f"{url}/metrics", timeout=30)
    assert refused.status_code == 403
    assert refused.json()["error"] == "metrics need a source address in WEBHOOK_ALLOWED_SOURCES (127.0.0.1 is not)"

    with receiver(ledger, allowed_sources=(ipaddress.ip_network("127.0.0.0/8"),)) as url:
        scrape(url)

    with receiver(ledger, allowed_sources=elsewhere, metrics_token=METRICS_TOKEN) as url:
        refused = requests.get(f"{url}/metrics", timeout=30)
        before = scrape(url, Authorization=f"Bearer {METRICS_TOKEN}")
        assert post(url, DOC_JSON) == 403  # a callback from outside the allowlist is counted too
        after = scrape(url, Authorization=f"Bearer {METRICS_TOKEN}")
    assert refused.status_code == 403
    outcome = {"outcome": "refused_4xx"}
    assert (
        value(after, "cos_webhook_callbacks_total", **outcome) - value(before, "cos_webhook_callbacks_total", **outcome)
        == 1
    )
    assert value(after, "cos_webhook_ack_seconds_count") - value(before, "cos_webhook_ack_seconds_count") == 1
    assert " or Authorization: Bearer <WEBHOOK_METRICS_TOKEN>" in refused.json()["error"]


# -- real processes --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gunicorn_processes_are_summed_and_scrapes_are_not_logged(ledger: Ledger, tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    (directory / "counter_99999.db").write_bytes(b"left by an earlier run")
    env = {
        "WEBHOOK_DATABASE_URL": ledger.url,
        "WEBHOOK_CALLBACK_TOKEN": TOKEN,
        "WEB_CONCURRENCY": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
    }
    log = tmp_path / "web.log"
    with web(env, log) as (url, proc):
        wait_healthy(url, proc, log)
        assert not (directory / "counter_99999.db").exists()
        assert post(url, b"<Response/>") == 400
        posted = [post(url, DOC_JSON)]
        # Each request on a new connection, which either process may accept: post until both
        # have counted some, so that a scrape of either can only be right by summing them.
        while len([n for n in counted_per_process(directory).values() if n]) < 2 and len(posted) < 300:
            posted.append(post(url, DOC_JSON))
        scraped = [scrape(url) for _ in range(12)]
    assert len([n for n in counted_per_process(directory).values() if n]) == 2
    assert set(posted) == {200}
    for samples in scraped:
        assert value(samples, "cos_webhook_callbacks_total", outcome="stored") == 1
        assert value(samples, "cos_webhook_callbacks_total", outcome="duplicate") == len(posted) - 1
        assert value(samples, "cos_webhook_callbacks_total", outcome="refused_4xx") == 1
        assert value(samples, "cos_webhook_ack_seconds_count") == len(posted) + 1
        assert value(samples, "cos_webhook_jobs", status="received") == 1  # read once, not summed per process
    logged = log.read_text()
    assert "POST /callback/<token> 200" in logged
    assert not re.search(r"GET /(metrics|healthz|readyz|livez)", logged)


def counted_per_process(directory: Path) -> dict[str, float]:
    """Callbacks each web process has counted, from its own file in the multiprocess directory."""
    counted = {}
    for path in directory.glob("counter_*.db"):
        families = MultiProcessCollector.merge([str(path)])
        counted[path.stem] = sum(
            sample.value for family in families if family.name == "cos_webhook_callbacks" for sample in family.samples
        )
    return counted


@pytest.mark.slow
def test_a_worker_process_serves_its_own_metrics_and_the_ledger_gauges(pipeline: Pipeline, tmp_path: Path) -> None:
    port = free_port()
    env = settings_env(pipeline.settings) | {
        "WEBHOOK_WORKER_METRICS_PORT": str(port),
        "WEBHOOK_WORKER_METRICS_DIR": str(tmp_path / "worker-metrics"),
        "WEBHOOK_METRICS_TOKEN": METRICS_TOKEN,
        "WEBHOOK_HEARTBEAT_SECONDS": "1",
    }
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        pipeline.wait_until(lambda: _answers(f"{url}/livez"), what=f"the worker's metrics port\n{log}")
        assert requests.get(f"{url}/metrics", timeout=10).status_code == 403
        job_id = pipeline.submit(pipeline.upload_input())
        pipeline.wait_until(lambda: pipeline.status(job_id) == "delivered", timeout=60, what="delivery")
        samples = scrape(url, Authorization=f"Bearer {METRICS_TOKEN}")
        assert requests.get(f"{url}/readyz", timeout=10).json() == {"status": "ok"}
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert worker.returncode == 0, log.read_text()
    assert value(samples, "cos_webhook_verifications_total", outcome="ok") == 1
    for sink in ("filesystem", "http"):
        assert value(samples, "cos_webhook_deliveries_total", sink=sink, outcome="ok") == 1
        assert value(samples, "cos_webhook_deliveries_total", sink=sink, outcome="dead") == 0  # started at 0
        assert value(samples, "cos_webhook_delivery_latency_seconds_count", sink=sink) == 1
    assert value(samples, "cos_webhook_step_seconds_count", step="fetch") == 1
    assert value(samples, "cos_webhook_callbacks_total", outcome="stored") == 0  # the receiver's, not this process's
    assert value(samples, "cos_webhook_jobs", status="delivered") == 1
    assert value(samples, "cos_webhook_workers") == 1


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def test_the_multiprocess_directory_is_made_or_emptied(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(metrics_dir.VARIABLE, "")  # unset, and restored so after the test
    made = metrics_dir.prepare()
    assert os.environ[metrics_dir.VARIABLE] == str(made)
    assert made.is_dir()
    metrics_dir.remove_made()
    assert not made.exists()

    given = tmp_path / "given"
    monkeypatch.setenv(metrics_dir.VARIABLE, str(given))
    assert metrics_dir.prepare() == given  # created when missing
    (given / "counter_1.db").write_bytes(b"")
    (given / "notes.txt").write_text("kept")
    assert metrics_dir.prepare() == given
    assert sorted(path.name for path in given.iterdir()) == ["notes.txt"]
    metrics_dir.remove_made()
    assert given.is_dir()  # the operator's directory stays

    metrics_dir.count_in_process()
    assert metrics_dir.VARIABLE not in os.environ
