"""The worker: claim due work from the ledger, verify, fetch, deliver, and record the outcome."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

import sqlalchemy.exc
from qcloud_cos import CosS3Client

from webhook.config import Settings
from webhook.cos import make_client
from webhook.errors import ConfigError
from webhook.events import build_event
from webhook.fetch import FetchError, describe_object, fetch_object, presigned_url, sweep_staging
from webhook.ledger import Claim, Delivery, DeliveryClaim, Ledger, Task, VerifyClaim, Version, utcnow
from webhook.models import FetchedFile, Job, ObjectLocation, job_from_json
from webhook.retry import RetryPolicy, backoff_delay, exhausted
from webhook.sinks import DeliveryError, NotificationSink, Sink
from webhook.sinks.config import SinkSpec, build_sinks
from webhook.verify import (
    Accept,
    Allowlist,
    Reject,
    Verdict,
    VerifyError,
    Wait,
    decide,
    describe_job,
    overall,
    precheck,
)

log = logging.getLogger(__name__)

ClientFactory = Callable[[str], CosS3Client]


class Worker:
    """Runs claims one at a time; start several processes to run more."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        specs: list[SinkSpec],
        sinks: dict[str, Sink],
        client_for_region: ClientFactory,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.specs = {spec.name: spec for spec in specs}
        self.sinks = sinks
        self.client_for_region = client_for_region
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.allow = Allowlist(settings.allowed_buckets, settings.allowed_regions, settings.allowed_tags)
        self.stopping = threading.Event()

    @classmethod
    def from_settings(cls, settings: Settings, ledger: Ledger | None = None) -> Worker:
        settings.check_worker()
        clients: dict[str, CosS3Client] = {}

        def client_for_region(region: str) -> CosS3Client:
            if region not in clients:
                clients[region] = make_client(
                    settings.secret_id, settings.secret_key, region, settings.cos_endpoint, settings.cos_timeout
                )
            return clients[region]

        specs = settings.sink_specs()
        if not specs:
            raise ConfigError(
                "no sink is configured: set WEBHOOK_SINK_DIR or WEBHOOK_HTTP_SINK_URL, "
                f"or declare sinks in {settings.config_path} (WEBHOOK_CONFIG)"
            )
        sinks = build_sinks(specs, settings.build_context())
        ledger = ledger or Ledger(settings.database_url)
        ledger.create_schema()
        return cls(settings, ledger, specs, sinks, client_for_region)

    # -- loop ------------------------------------------------------------------------------

    def run(self, burst: bool = False) -> int:
        """Process work until stopped (or, with ``burst``, until nothing is due). Returns claims run."""
        done = outage = 0
        # How long to wait out a ledger outage: the poll interval, doubling up to 30 s.
        patience = RetryPolicy(backoff_base=self.settings.poll_interval, backoff_cap=30.0)
        log.info("worker %s started sinks=%s burst=%s", self.worker_id, ",".join(self.sinks), burst)
        if removed := sweep_staging(self.settings.temp_dir):
            log.info("removed %d downloads left by stopped workers", removed)
        while not self.stopping.is_set():
            try:
                worked = self.run_once()
            except sqlalchemy.exc.SQLAlchemyError as exc:
                # The ledger is away (database restarting, network): nothing was lost — a claimed
                # task's lease runs out and it becomes due again. Wait and try again.
                outage += 1
                delay = backoff_delay(outage, patience)
                log.error("ledger unavailable (%s); retrying in %.1fs", type(exc).__name__, delay)
                self.stopping.wait(delay)
                continue
            if outage:
                log.info("ledger reachable again after %d failed attempts", outage)
                outage = 0
            if worked:
                done += 1
            elif burst:
                break
            else:
                self.stopping.wait(self.settings.poll_interval)
        log.info("worker %s stopped after %d claims", self.worker_id, done)
        return done

    def close(self) -> None:
        """Release every sink's connections (queues and streams hold sockets open)."""
        for sink in self.sinks.values():
            sink.close()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT finish the current claim, then stop (PaaS restarts send SIGTERM)."""

        def stop(signum: int, _frame: FrameType | None) -> None:
            log.info("worker %s got signal %d; stopping after the current claim", self.worker_id, signum)
            self.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def run_once(self) -> bool:
        """Claim and process one unit of work; False when nothing is due."""
        claim = self.ledger.queue.claim(self.worker_id, self.settings.lease_seconds)
        if claim is None:
            return False
        with self._lease_kept([t.id for t in claim.tasks]):
            try:
                match claim:
                    case VerifyClaim():
                        self._verify(claim)
                    case DeliveryClaim():
                        self._deliver(claim)
            except Exception as exc:  # a failure no step foresaw stays with these tasks, not the worker
                log.exception("job=%s step failed unexpectedly", claim.tasks[0].job_id)
                for task in claim.tasks:
                    self._failed(task, claim, self._error_text(exc), self._policy(task))
        return True

    # -- steps -----------------------------------------------------------------------------

    def _verify(self, claim: VerifyClaim) -> None:
        task = claim.task
        judged: list[tuple[Version, Job | None, Verdict]] = []
        reported: dict[tuple[str, str], Job | None] = {}  # CI's answer per (region, bucket): asked once
        for version in claim.versions:
            try:
                job = job_from_json(version.detail)
            except ValueError as exc:
                judged.append((version, None, Reject(f"unreadable job row: {exc}")))
                continue
            verdict: Verdict | None = precheck(job, self.allow)
            if verdict is None:
                assert job.input is not None  # precheck guarantees it
                where = (job.input.region, job.input.bucket)
                if where not in reported:
                    try:
                        reported[where] = describe_job(self.client_for_region(where[0]), where[1], job.job_id)
                    except VerifyError as exc:
                        self._failed(task, claim, str(exc), self.settings.verify_retry)
                        return
                verdict = decide(job, reported[where], self.allow)
            judged.append((version, job, verdict))
        rejected = {version.id: verdict.reason for version, _, verdict in judged if isinstance(verdict, Reject)}
        if not any(job for _, job, _ in judged):
            # Nothing CI could be asked about: a dead task to look at, not a verdict on the job.
            reasons = "; ".join(dict.fromkeys(rejected.values()))
            self._failed(task, claim, reasons, self._policy(task), final="nothing readable to verify")
            return
        match overall([verdict for _, _, verdict in judged]):
            case Accept():
                version, job = next((v, j) for v, j, verdict in judged if isinstance(verdict, Accept) and j)
                sinks = sorted(name for name, spec in self.specs.items() if spec.accepts(job))
                self.ledger.queue.accept(task, self.worker_id, sinks, version, job, rejected)
                log.info("job=%s verified state=%s deliveries=%s", job.job_id, job.state, ",".join(sinks))
            case Reject(reason):
                self.ledger.queue.reject(task, self.worker_id, reason, rejected)
                log.warning("job=%s rejected: %s", task.job_id, reason)
            case Wait(reason):
                self._failed(task, claim, reason, self.settings.verify_retry)

    def _deliver(self, claim: DeliveryClaim) -> None:
        try:
            job = job_from_json(claim.detail)
        except ValueError as exc:
            for delivery in claim.deliveries:
                self._failed(delivery, claim, f"unreadable job row: {exc}", self._policy(delivery), final="unreadable")
            return
        for unknown in (d for d in claim.deliveries if d.sink not in self.sinks):
            self._failed(unknown, claim, f"sink {unknown.sink} is not configured in this worker", self.settings.retry)
        # Storage sinks first: a notification may point at the copy one of them makes.
        deliveries = sorted(
            (d for d in claim.deliveries if d.sink in self.sinks),
            key=lambda d: isinstance(self.sinks[d.sink], NotificationSink),
        )
        fetched: FetchedFile | None = None
        if job.succeeded and deliveries:
            assert job.output is not None  # verification refuses a success without output
            try:
                client = self.client_for_region(job.output.region)
                if any(self.sinks[d.sink].needs_bytes(job) for d in deliveries):
                    fetched = fetch_object(client, job.output, self.settings.temp_dir)
                else:
                    fetched = describe_object(client, job.output)
            except Exception as exc:
                # One delay for all: the deliveries stay due together, so the next try fetches once.
                together = max(backoff_delay(d.attempts, self._policy(d)) for d in deliveries)
                for delivery in deliveries:
                    self._failed(delivery, claim, self._error_text(exc), self._policy(delivery), delay=together)
                return
            log.info("job=%s fetched=%s %s bytes=%d", job.job_id, bool(fetched.path), job.output.key, fetched.size)
        stored = {name: self.sinks[name] for name in claim.delivered_to if name in self.sinks}
        try:
            for delivery in deliveries:
                if self._deliver_to(delivery, claim, job, fetched, stored):
                    stored[delivery.sink] = self.sinks[delivery.sink]
        finally:
            if fetched is not None and fetched.path is not None:
                os.unlink(fetched.path)

    def _deliver_to(
        self, delivery: Delivery, claim: DeliveryClaim, job: Job, fetched: FetchedFile | None, stored: dict[str, Sink]
    ) -> bool:
        """One sink's delivery; ``stored`` are the sinks that already have the job's file."""
        sink = self.sinks[delivery.sink]
        try:
            location = None
            if fetched and isinstance(sink, NotificationSink):
                location = sink.locate(job, stored, self._presign_source)
            sink.deliver(build_event(job, delivery.sink, fetched, location))
        except DeliveryError as exc:
            final = "refused permanently" if exc.permanent else None
            self._failed(delivery, claim, exc.message, self._policy(delivery), exc.retry_after, final)
            return False
        except Exception as exc:  # a sink's own bug must cost its delivery an attempt, not the worker
            log.exception("job=%s sink=%s failed unexpectedly", delivery.job_id, delivery.sink)
            self._failed(delivery, claim, self._error_text(exc), self._policy(delivery))
            return False
        if self.ledger.queue.complete(delivery, self.worker_id):
            log.info("job=%s sink=%s delivered attempt=%d", delivery.job_id, delivery.sink, delivery.attempts)
        else:
            log.warning("job=%s sink=%s delivered but the lease was lost", delivery.job_id, delivery.sink)
        return True

    def _error_text(self, exc: BaseException) -> str:
        """What is recorded on the task: our own errors' messages, else the type and message, secrets removed."""
        text = str(exc) if isinstance(exc, VerifyError | FetchError) else f"{type(exc).__name__}: {exc}"
        for secret in (self.settings.secret_key, self.settings.http_sink_secret):
            if secret:
                text = text.replace(secret, "[redacted]")
        return text[:500]

    def _presign_source(self, where: ObjectLocation, seconds: int) -> str:
        # Signed for the public host: a URL for WEBHOOK_COS_ENDPOINT's address would lose the
        # bucket name and carry a signature over that address.
        public = make_client(self.settings.secret_id, self.settings.secret_key, where.region)
        return presigned_url(public, where, seconds)

    def _policy(self, task: Task) -> RetryPolicy:
        if not isinstance(task, Delivery):
            return self.settings.verify_retry
        spec = self.specs.get(task.sink)
        return spec.retry if spec is not None else self.settings.retry

    def _failed(
        self,
        task: Task,
        claim: Claim,
        error: str,
        policy: RetryPolicy,
        retry_after: float | None = None,
        final: str | None = None,
        delay: float | None = None,
    ) -> None:
        """Schedule the task again with backoff, or mark it dead once retrying cannot help.

        ``final`` says why retrying cannot help at all (e.g. "refused permanently"); the dead
        task's error then says so, as it says when the attempts or ``max_age`` ran out.
        """
        where = f"job={task.job_id} step={task.kind}" + (f" sink={task.sink}" if isinstance(task, Delivery) else "")
        age = (utcnow() - claim.received_at).total_seconds()
        too_old = policy.max_age is not None and age > policy.max_age
        if final is not None:
            error = f"{error} ({final})"
        elif too_old:
            error = f"{error} (gave up: older than max_age {policy.max_age:g}s)"
        elif exhausted(task.attempts, policy):
            error = f"{error} (ran out of {task.attempts} attempts)"
        if final is not None or too_old or exhausted(task.attempts, policy):
            self.ledger.queue.give_up(task, self.worker_id, error)
            log.error("%s dead after %d attempts: %s", where, task.attempts, error)
            return
        if delay is None:
            delay = backoff_delay(task.attempts, policy, retry_after)
        self.ledger.queue.retry_later(task, self.worker_id, error, delay)
        log.warning("%s attempt %d failed, retry in %.1fs: %s", where, task.attempts, delay, error)

    @contextmanager
    def _lease_kept(self, task_ids: Sequence[int]) -> Iterator[None]:
        """Renew the lease while a long step (a large download, a slow sink) runs."""
        finished = threading.Event()
        interval = self.settings.lease_seconds / 3

        def renew() -> None:
            while not finished.wait(interval):
                try:
                    self.ledger.queue.extend_lease(task_ids, self.worker_id, self.settings.lease_seconds)
                except Exception:
                    log.exception("could not renew lease on tasks %s", list(task_ids))

        keeper = threading.Thread(target=renew, name="lease-keeper", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            finished.set()
            keeper.join()
