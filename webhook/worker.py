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

from webhook.config import ConfigError, RetryPolicy, Settings
from webhook.cos import make_client
from webhook.events import build_event
from webhook.fetch import FetchError, describe_object, fetch_object, presigned_url, sweep_staging
from webhook.ledger import Claim, Ledger, Task, utcnow
from webhook.models import FetchedFile, FileLocation, Job, TaskKind
from webhook.retry import backoff_delay, exhausted
from webhook.sinks import DeliveryError, Sink
from webhook.sinks.config import NotifyOptions, SinkSpec, build_sinks, sink_specs
from webhook.verify import Accept, Allowlist, Reject, Verdict, VerifyError, Wait, decide, describe_job, precheck

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

        specs = sink_specs(settings)
        if not specs:
            raise ConfigError(
                "no sink is configured: set WEBHOOK_SINK_DIR or WEBHOOK_HTTP_SINK_URL, "
                f"or declare sinks in {settings.config_path} (WEBHOOK_CONFIG)"
            )
        sinks = build_sinks(specs, settings)
        ledger = ledger or Ledger(settings.database_url)
        ledger.create_schema()
        return cls(settings, ledger, specs, sinks, client_for_region)

    # -- loop ------------------------------------------------------------------------------

    def run(self, burst: bool = False) -> int:
        """Process work until stopped (or, with ``burst``, until nothing is due). Returns claims run."""
        done = outage = 0
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
                delay = min(30.0, self.settings.poll_interval * 2.0 ** min(outage, 6))
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
        claim = self.ledger.claim(self.worker_id, self.settings.lease_seconds)
        if claim is None:
            return False
        with self._lease_kept([t.id for t in claim.tasks]):
            if claim.kind == TaskKind.VERIFY:
                self._verify(claim, claim.tasks[0])
            else:
                self._deliver(claim)
        return True

    # -- steps -----------------------------------------------------------------------------

    def _verify(self, claim: Claim, task: Task) -> None:
        job = claim.job
        verdict: Verdict | None = precheck(job, self.allow)
        if verdict is None:
            assert job.input is not None  # precheck guarantees it
            try:
                reported = describe_job(self.client_for_region(job.input.region), job.input.bucket, job.job_id)
            except VerifyError as exc:
                self._failed(task, str(exc), self.settings.retry, claim)
                return
            verdict = decide(job, reported, self.allow)
        match verdict:
            case Accept():
                sinks = sorted(name for name, spec in self.specs.items() if spec.accepts(job))
                self.ledger.accept(task, self.worker_id, sinks)
                log.info("job=%s verified state=%s deliveries=%s", job.job_id, job.state, ",".join(sinks))
            case Reject(reason):
                self.ledger.reject(task, self.worker_id, reason)
                log.warning("job=%s rejected: %s", job.job_id, reason)
            case Wait(reason):
                self._failed(task, reason, self.settings.verify_retry, claim)

    def _deliver(self, claim: Claim) -> None:
        job = claim.job
        # Storage sinks first: a notification may point at the copy one of them makes.
        tasks = sorted(claim.tasks, key=lambda t: self._is_notification(t.sink))
        unknown = [t for t in tasks if t.sink not in self.sinks]
        for task in unknown:
            self._failed(task, f"sink {task.sink} is not configured in this worker", self.settings.retry, claim)
        tasks = [t for t in tasks if t.sink in self.sinks]
        fetched: FetchedFile | None = None
        if job.succeeded and tasks:
            assert job.output is not None  # verification refuses a success without output
            client = self.client_for_region(job.output.region)
            try:
                if any(self.sinks[t.sink].needs_bytes(job) for t in tasks):
                    fetched = fetch_object(client, job.output, self.settings.temp_dir)
                else:
                    fetched = describe_object(client, job.output)
            except FetchError as exc:
                # One delay for all: the deliveries stay due together, so the next try fetches once.
                together = max(backoff_delay(t.attempts, self._policy(t)) for t in tasks)
                for task in tasks:
                    self._failed(task, str(exc), self._policy(task), claim, delay=together)
                return
            log.info("job=%s fetched=%s %s bytes=%d", job.job_id, bool(fetched.path), job.output.key, fetched.size)
        delivered = set(claim.delivered_to)
        try:
            for task in tasks:
                if self._deliver_to(task, claim, fetched, delivered):
                    delivered.add(task.sink)
        finally:
            if fetched is not None and fetched.path is not None:
                os.unlink(fetched.path)

    def _deliver_to(self, task: Task, claim: Claim, fetched: FetchedFile | None, delivered: set[str]) -> bool:
        sink = self.sinks[task.sink]
        try:
            location = self._location(task.sink, claim.job, delivered) if fetched else None
            sink.deliver(build_event(claim.job, task.sink, fetched, location))
        except DeliveryError as exc:
            self._failed(task, exc.message, self._policy(task), claim, exc.retry_after, permanent=exc.permanent)
            return False
        if self.ledger.delivered(task, self.worker_id):
            log.info("job=%s sink=%s delivered attempt=%d", task.job_id, task.sink, task.attempts)
        else:
            log.warning("job=%s sink=%s delivered but the lease was lost", task.job_id, task.sink)
        return True

    def _is_notification(self, sink: str) -> bool:
        spec = self.specs.get(sink)
        return spec is not None and isinstance(spec.options, NotifyOptions)

    def _location(self, sink: str, job: Job, delivered: set[str]) -> FileLocation | None:
        """Where a notification sink's message says the file is."""
        options = self.specs[sink].options
        if not isinstance(options, NotifyOptions):
            return None
        if options.file_from is not None:
            if options.file_from not in delivered:
                raise DeliveryError(f"{sink}: waiting for sink {options.file_from} to store the file")
            return self.sinks[options.file_from].location(job, options.presign_seconds)
        assert job.output is not None
        url = ""
        if options.presign_seconds:
            # Signed for the public host: a URL for WEBHOOK_COS_ENDPOINT's address would lose the
            # bucket name and carry a signature over that address.
            public = make_client(self.settings.secret_id, self.settings.secret_key, job.output.region)
            url = presigned_url(public, job.output, options.presign_seconds)
        return FileLocation("source", job.output.bucket, job.output.key, job.output.region, url=url)

    def _policy(self, task: Task) -> RetryPolicy:
        spec = self.specs.get(task.sink)
        return spec.retry.policy() if spec is not None else self.settings.retry

    def _failed(
        self,
        task: Task,
        error: str,
        policy: RetryPolicy,
        claim: Claim | None = None,
        retry_after: float | None = None,
        permanent: bool = False,
        delay: float | None = None,
    ) -> None:
        """Schedule the task again with backoff, or mark it dead once retrying cannot help."""
        where = f"job={task.job_id} step={task.kind}" + (f" sink={task.sink}" if task.sink else "")
        too_old = (
            claim is not None
            and policy.max_age is not None
            and (utcnow() - claim.received_at).total_seconds() > policy.max_age
        )
        if too_old:
            error = f"{error} (gave up: older than max_age {policy.max_age:g}s)"
        if permanent or too_old or exhausted(task.attempts, policy):
            self.ledger.give_up(task, self.worker_id, error)
            log.error("%s dead after %d attempts: %s", where, task.attempts, error)
            return
        if delay is None:
            delay = backoff_delay(task.attempts, policy, retry_after)
        self.ledger.retry_later(task, self.worker_id, error, delay)
        log.warning("%s attempt %d failed, retry in %.1fs: %s", where, task.attempts, delay, error)

    @contextmanager
    def _lease_kept(self, task_ids: Sequence[int]) -> Iterator[None]:
        """Renew the lease while a long step (a large download, a slow sink) runs."""
        finished = threading.Event()
        interval = self.settings.lease_seconds / 3

        def renew() -> None:
            while not finished.wait(interval):
                try:
                    self.ledger.extend_lease(task_ids, self.worker_id, self.settings.lease_seconds)
                except Exception:
                    log.exception("could not renew lease on tasks %s", list(task_ids))

        keeper = threading.Thread(target=renew, name="lease-keeper", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            finished.set()
            keeper.join()
