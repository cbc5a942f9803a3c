"""The worker: named services that run together, the claim loop among them.

:class:`Worker` owns its services (:mod:`webhook.worker.services`): the heartbeat and the lease
renewal (:mod:`~webhook.worker.liveness`), the wake-up (:class:`~webhook.ledger.wakeup.Wakeup`),
reconcile and prune (:mod:`~webhook.worker.periodic`), the metrics server when one is
configured, and the :class:`ClaimLoop`. They start together and stop together; one failing stops
the worker with a non-zero exit.

The claim loop claims due work and runs each claim's pipeline in a thread of its own, as the
worker's lanes (:mod:`webhook.worker.lanes`) have room: up to ``WEBHOOK_WORKER_CONCURRENCY``
verifications and each sink's ``concurrency`` deliveries are in flight per process, so cloud
latency overlaps and a slow or hanging sink holds up only its own deliveries. An idle worker
sleeps until the ledger says there may be work, or a slot is free, at most the poll interval.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from webhook.ci.client import ClientFactory, client_for
from webhook.config import Settings
from webhook.intake.reconcile import PeriodicReconcile
from webhook.ledger import Claim, Ledger, LedgerUnavailable
from webhook.ledger.wakeup import Wakeup
from webhook.retry import RetryPolicy, backoff_delay
from webhook.sinks import Sink
from webhook.sinks.build import build_sinks, sink_context
from webhook.sinks.config import SinkSpec
from webhook.worker.lanes import Held, Lanes
from webhook.worker.liveness import Heartbeat, Leases
from webhook.worker.outcomes import Recorder
from webhook.worker.periodic import Periodic, PeriodicPrune
from webhook.worker.pipeline import Pipeline
from webhook.worker.services import Service, Services, Shutdown
from webhook.worker.staging import Staging

log = logging.getLogger("webhook.worker")

WAIT_SLICE = 0.05  # seconds: how quickly an idle worker notices it was told to stop
CLAIM_SPACING = 0.05  # seconds between claims while nothing more is due


class Worker:
    """Claims due work and runs it as its lanes have room, beside its other services."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        specs: list[SinkSpec],
        sinks: dict[str, Sink],
        client_for_region: ClientFactory,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.sinks = sinks
        tag = uuid.uuid4().hex[:8]  # names this worker's partial downloads
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{tag}"
        self.staging = Staging(settings.temp_dir, settings.staging_max_bytes, tag, settings.min_transfer_rate)
        self.shutdown = Shutdown(settings.shutdown_seconds, "worker", self._hard_stop)
        self.stopping = self.shutdown.stopping
        self.heartbeat = Heartbeat(ledger, self.worker_id, settings.heartbeat_seconds, self._took_over)
        self.leases = Leases(ledger, self.worker_id, settings.lease_seconds)
        self.wakeup = Wakeup(ledger.engine)
        self.reconciler = PeriodicReconcile(settings, ledger, self.worker_id)
        self.pruner = PeriodicPrune(ledger, self.worker_id, settings.retention_days)
        slots = {spec.name: settings.sink_slots(spec) for spec in specs}
        self.lanes = Lanes(settings.worker_concurrency, slots, on_release=self.wakeup.event.set)  # a slot is free
        breakers = {spec.name: settings.sink_breaker(spec) for spec in specs}
        self.pipeline = Pipeline(
            settings,
            Recorder(ledger, self.worker_id, settings.lease_seconds, breakers),
            {spec.name: spec for spec in specs},
            sinks,
            client_for_region,
            self.staging,
            self.shutdown,
            self.leases,
            self.lanes,
        )

    @classmethod
    def from_settings(cls, settings: Settings, ledger: Ledger | None = None) -> Worker:
        settings.check_worker(sinks=True)
        specs = settings.require_sinks()
        sinks = build_sinks(specs, sink_context(settings))
        ledger = ledger or Ledger(settings.database_url)
        ledger.prepare(settings.auto_migrate)
        ledger.breakers.ensure(sinks)  # every configured sink's breaker is listed from the start
        # One client per region, kept: its session pools the connections.
        return cls(settings, ledger, specs, sinks, functools.cache(functools.partial(client_for, settings)))

    def run(self, burst: bool = False, metrics_server: Service | None = None) -> int:
        """Run every service until stopped (or, with ``burst``, until nothing is due); returns claims run.

        Raises :class:`~webhook.worker.services.ServiceFailed` when a service failed.
        """
        log.info(
            "worker %s started sinks=%s concurrency=%d slots=%s burst=%s",
            self.worker_id,
            ",".join(self.sinks),
            self.settings.worker_concurrency,
            ",".join(f"{sink}:{n}" for sink, n in self.lanes.sizes.items() if sink),
            burst,
        )
        periodic = (self.reconciler, self.pruner)
        claims = ClaimLoop(self, periodic if burst else None)
        extra = [metrics_server] if metrics_server is not None else []
        # Started in this order, stopped in reverse: the claim loop finishes its work in hand first.
        Services([self.heartbeat, self.leases, self.wakeup, *periodic, *extra, claims], self.shutdown).run()
        return claims.finished

    def close(self) -> None:
        """Release every sink's connections (queues and streams hold sockets open)."""
        for sink in self.sinks.values():
            sink.close()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the worker within WEBHOOK_SHUTDOWN_SECONDS (see :class:`Shutdown`)."""
        self.shutdown.install_signal_handlers()

    def _hard_stop(self) -> None:
        # Stuck in a call no deadline covers: give the work back and go before the PaaS's SIGKILL.
        released = self.ledger.workers.leave(self.worker_id)
        log.error("worker %s stopped hard after its shutdown budget; released %d leases", self.worker_id, released)
        os._exit(1)

    def _took_over(self) -> None:
        """Remove partial downloads of workers that are gone (at start: of any no longer alive)."""
        live = {worker.id.rsplit(":", 1)[-1] for worker in self.ledger.workers.live()}
        if removed := self.staging.sweep(live):
            log.info("removed %d partial downloads of stopped workers", removed)


class ClaimLoop:
    """The worker's service that registers the worker, then claims due work and runs it.

    With ``burst`` (the periodic services of the run), it ends once nothing is due, none of its
    claims is in flight and each periodic service has caught up: what reconcile records in a
    burst is delivered in it.
    """

    name = "claim loop"

    def __init__(self, worker: Worker, burst: Sequence[Periodic[Any]] | None = None) -> None:
        self.worker = worker
        self.settings = worker.settings
        self.burst = burst
        self.finished = 0  # claims run

    def run(self, stopping: threading.Event) -> None:
        # A thread per slot: a claim holds at least one slot for as long as it runs.
        with ThreadPoolExecutor(self.worker.lanes.capacity, thread_name_prefix="claim") as pool:
            self._loop(pool, stopping)

    def _loop(self, pool: ThreadPoolExecutor, stopping: threading.Event) -> None:
        worker, queue, wakeup, lanes = self.worker, self.worker.ledger.queue, self.worker.wakeup, self.worker.lanes
        outage = 0
        in_flight: set[Future[None]] = set()
        # How long to wait out a ledger outage: the poll interval, doubling up to 30 s.
        patience = RetryPolicy(backoff_base=self.settings.poll_interval, backoff_cap=30.0)
        while not stopping.is_set():
            done = {future for future in in_flight if future.done()}
            in_flight -= done
            self.finished += len(done)
            room = lanes.reserve()
            free = room.total
            try:
                if not worker.heartbeat.running:
                    worker.heartbeat.beat()  # registered first: others take over an unknown worker's leases
                claims = queue.claim_lanes(worker.worker_id, self.settings.lease_seconds, room) if free else []
            except LedgerUnavailable as exc:
                lanes.claimed(room, [])
                # The ledger is away (database restarting, network): nothing was lost — a claimed
                # task's lease runs out and it becomes due again. Wait and try again.
                outage += 1
                delay = backoff_delay(outage, patience)
                log.error("ledger unavailable (%s); retrying in %.1fs", exc.kind, delay)
                stopping.wait(delay)
                continue
            if outage:
                log.info("ledger reachable again after %d failed attempts", outage)
                outage = 0
            for claim, held in zip(claims, lanes.claimed(room, claims), strict=True):
                future = pool.submit(self._run_claim, claim, held)
                future.add_done_callback(lambda _: wakeup.event.set())  # a slot is free
                in_flight.add(future)
            if self._burst_done(claims, in_flight):
                break
            if sum(len(claim.tasks) for claim in claims) < free:
                self._idle(stopping, nothing_more_due=time.monotonic())
            elif not free:
                self._idle(stopping)
        # What is in flight finishes first (the shutdown bounds how long it may take).
        pool.shutdown(wait=True)
        self.finished += len(in_flight)
        log.info("worker %s stopped after %d claims", worker.worker_id, self.finished)

    def _burst_done(self, claims: list[Claim], in_flight: set[Future[None]]) -> bool:
        if self.burst is None or claims or in_flight:
            return False
        return all(periodic.caught_up() for periodic in self.burst)

    def _idle(self, stopping: threading.Event, nothing_more_due: float | None = None) -> None:
        """Until new work may be due: a wake-up, a finished claim, a stop, or the poll interval.

        After a claim found no more work (at ``nothing_more_due``), the next comes at least
        CLAIM_SPACING later: on SQLite every commit wakes the worker, its own included, and an
        empty claim still takes the write lock its claims in flight are waiting for.
        """
        for _ in range(max(1, round(self.settings.poll_interval / WAIT_SLICE))):
            if self.worker.wakeup.wait(WAIT_SLICE) or stopping.is_set():
                break
        if nothing_more_due is not None and (rest := nothing_more_due + CLAIM_SPACING - time.monotonic()) > 0:
            stopping.wait(rest)

    def _run_claim(self, claim: Claim, held: Held) -> None:
        try:
            self.worker.pipeline.run(claim, held)
        except LedgerUnavailable as exc:
            # An outcome could not be recorded: the lease runs out and the task is due again.
            log.error("ledger unavailable while recording an outcome (%s)", exc.kind)
        except Exception:  # nothing else may end silently in the pool's future
            log.exception("claim failed unexpectedly; its tasks are due again when the lease runs out")
