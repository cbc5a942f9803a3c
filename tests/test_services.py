"""One runtime for a process's services: started together, stopped in reverse, one failing stops all loudly."""

from __future__ import annotations

import logging
import threading

import pytest
from support.pipeline import DONE, Pipeline

from webhook.worker import services
from webhook.worker.services import ServiceFailed, Services, Shutdown


def no_hard_stop() -> None:
    raise AssertionError("the shutdown should not have stopped the process hard")


class Recording:
    """A service that notes when it starts and ends in ``events``; ``fail`` raises from its body."""

    def __init__(self, name: str, events: list[str], fail: bool = False, ends: bool = False) -> None:
        self.name = name
        self.events = events
        self.fail = fail
        self.ends = ends
        self.started = threading.Event()

    def run(self, stopping: threading.Event) -> None:
        self.events.append(f"start {self.name}")
        self.started.set()
        if self.fail:
            raise RuntimeError(f"{self.name} broke")
        if not self.ends:
            stopping.wait()
        self.events.append(f"end {self.name}")


def run_in_thread(services: Services) -> tuple[threading.Thread, list[BaseException]]:
    raised: list[BaseException] = []

    def body() -> None:
        try:
            services.run()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, raised


def test_services_stop_in_reverse_order_each_ended_before_the_next_is_told() -> None:
    events: list[str] = []
    parts = [Recording(name, events) for name in ("heartbeat", "wakeup", "claim loop")]
    shutdown = Shutdown(5, "worker", no_hard_stop)
    thread, raised = run_in_thread(Services(parts, shutdown))
    for part in parts:
        assert part.started.wait(5)

    shutdown.begin("test over")
    thread.join(10)

    assert not thread.is_alive()
    assert raised == []
    assert events[3:] == ["end claim loop", "end wakeup", "end heartbeat"]
    assert shutdown.stopped.is_set()
    assert not shutdown.abandoning.is_set()


def test_a_failing_service_stops_the_others_and_the_run_raises_naming_it(caplog: pytest.LogCaptureFixture) -> None:
    events: list[str] = []
    steady = Recording("heartbeat", events)
    shutdown = Shutdown(5, "worker", no_hard_stop)
    caplog.set_level(logging.INFO, logger="webhook.worker.services")

    with pytest.raises(ServiceFailed, match=r"^reconcile failed: RuntimeError: reconcile broke$") as failed:
        Services([steady, Recording("reconcile", events, fail=True)], shutdown).run()

    assert failed.value.name == "reconcile"
    assert "end heartbeat" in events  # stopped, not left running
    assert shutdown.stopping.is_set()
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.getMessage() == "service reconcile failed: the worker stops"
    assert error.exc_info is not None
    assert "reconcile broke" in str(error.exc_info[1])
    assert any(r.getMessage().startswith("worker stopping (reconcile failed)") for r in caplog.records)


def test_a_service_that_ends_on_its_own_ends_the_run_without_a_shutdown() -> None:
    events: list[str] = []
    shutdown = Shutdown(5, "worker", no_hard_stop)

    Services([Recording("heartbeat", events), Recording("claim loop", events, ends=True)], shutdown).run()

    assert events[-1] == "end heartbeat"
    assert not shutdown.stopping.is_set()  # a burst's end: nothing was in hand to wait for


def test_work_in_hand_past_the_budget_is_abandoned_then_the_process_stops_hard(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(services, "HARD_STOP_GRACE", 0.2)  # the grace's length is not what is tested
    stopped_hard = threading.Event()
    stuck = threading.Event()

    class Stuck:
        name = "claim loop"

        def run(self, stopping: threading.Event) -> None:
            stuck.wait(30)  # outside any deadline: expiring them cannot end it

    shutdown = Shutdown(0.2, "worker", stopped_hard.set)
    thread, _ = run_in_thread(Services([Stuck()], shutdown))
    caplog.set_level(logging.INFO, logger="webhook.worker.services")

    shutdown.begin("signal SIGTERM")

    assert shutdown.abandoning.wait(5)
    assert stopped_hard.wait(10)
    stuck.set()
    thread.join(10)
    assert "worker: work in hand did not finish within 0.2s: abandoning it" in caplog.text


def test_a_worker_whose_service_fails_leaves_and_raises(pipeline: Pipeline, caplog: pytest.LogCaptureFixture) -> None:
    job_id = pipeline.submit(pipeline.upload_input())
    pipeline.wait_until(lambda: pipeline.status(job_id) == "received", what="the callback")

    class Broken:
        name = "metrics server"

        def run(self, stopping: threading.Event) -> None:
            # Fails once the worker has done its job: the claim loop is stopped, not cut off.
            pipeline.wait_until(lambda: pipeline.status(job_id) in DONE, what="the job to be done")
            raise OSError("address already in use")

    worker = pipeline.worker()
    caplog.set_level(logging.INFO)
    try:
        with pytest.raises(ServiceFailed, match=r"^metrics server failed: OSError: address already in use$"):
            worker.run(metrics_server=Broken())
    finally:
        worker.close()

    assert pipeline.status(job_id) == "delivered"
    assert pipeline.ledger.workers.live() == []  # it left, giving back anything it held
    assert "service metrics server failed: the worker stops" in caplog.text
    assert f"worker {worker.worker_id} stopped after 1 claims" in caplog.text
