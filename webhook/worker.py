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

from qcloud_cos import CosS3Client

from webhook.config import RetryPolicy, Settings
from webhook.cos import make_client
from webhook.events import build_event
from webhook.fetch import FetchError, fetch_object
from webhook.ledger import Claim, Ledger, Task
from webhook.models import FetchedFile, TaskKind
from webhook.retry import backoff_delay, exhausted
from webhook.sinks import DeliveryError, Sink, build_sinks
from webhook.verify import Accept, Allowlist, Reject, Verdict, VerifyError, Wait, decide, describe_job, precheck

log = logging.getLogger(__name__)

ClientFactory = Callable[[str], CosS3Client]


class Worker:
    """Runs claims one at a time; start several processes to run more."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        sinks: dict[str, Sink],
        client_for_region: ClientFactory,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
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
                clients[region] = make_client(settings.secret_id, settings.secret_key, region, settings.cos_endpoint)
            return clients[region]

        ledger = ledger or Ledger(settings.database_url)
        ledger.create_schema()
        return cls(settings, ledger, build_sinks(settings), client_for_region)

    # -- loop ------------------------------------------------------------------------------

    def run(self, burst: bool = False) -> int:
        """Process work until stopped (or, with ``burst``, until nothing is due). Returns claims run."""
        done = 0
        log.info("worker %s started sinks=%s burst=%s", self.worker_id, ",".join(self.sinks), burst)
        while not self.stopping.is_set():
            if self.run_once():
                done += 1
            elif burst:
                break
            else:
                self.stopping.wait(self.settings.poll_interval)
        log.info("worker %s stopped after %d claims", self.worker_id, done)
        return done

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
                self._failed(task, str(exc), self.settings.retry)
                return
            verdict = decide(job, reported, self.allow)
        match verdict:
            case Accept():
                sinks = sorted(self.sinks)
                self.ledger.accept(task, self.worker_id, sinks)
                log.info("job=%s verified state=%s deliveries=%s", job.job_id, job.state, ",".join(sinks))
            case Reject(reason):
                self.ledger.reject(task, self.worker_id, reason)
                log.warning("job=%s rejected: %s", job.job_id, reason)
            case Wait(reason):
                self._failed(task, reason, self.settings.verify_retry)

    def _deliver(self, claim: Claim) -> None:
        job = claim.job
        fetched: FetchedFile | None = None
        if job.succeeded:
            assert job.output is not None  # verification refuses a success without output
            try:
                fetched = fetch_object(self.client_for_region(job.output.region), job.output, self.settings.temp_dir)
            except FetchError as exc:
                for task in claim.tasks:
                    self._failed(task, str(exc), self.settings.retry)
                return
            log.info("job=%s fetched %s bytes=%d crc64=%s", job.job_id, job.output.key, fetched.size, fetched.crc64)
        try:
            for task in claim.tasks:
                self._deliver_to(task, claim, fetched)
        finally:
            if fetched is not None:
                os.unlink(fetched.path)

    def _deliver_to(self, task: Task, claim: Claim, fetched: FetchedFile | None) -> None:
        sink = self.sinks.get(task.sink)
        if sink is None:
            self._failed(task, f"sink {task.sink} is not configured in this worker", self.settings.retry)
            return
        try:
            sink.deliver(build_event(claim.job, task.sink, fetched))
        except DeliveryError as exc:
            self._failed(task, exc.message, self.settings.retry, exc.retry_after, permanent=exc.permanent)
            return
        if self.ledger.delivered(task, self.worker_id):
            log.info("job=%s sink=%s delivered attempt=%d", task.job_id, task.sink, task.attempts)
        else:
            log.warning("job=%s sink=%s delivered but the lease was lost", task.job_id, task.sink)

    def _failed(
        self,
        task: Task,
        error: str,
        policy: RetryPolicy,
        retry_after: float | None = None,
        permanent: bool = False,
    ) -> None:
        """Schedule the task again with backoff, or mark it dead once retrying cannot help."""
        where = f"job={task.job_id} step={task.kind}" + (f" sink={task.sink}" if task.sink else "")
        if permanent or exhausted(task.attempts, policy):
            self.ledger.give_up(task, self.worker_id, error)
            log.error("%s dead after %d attempts: %s", where, task.attempts, error)
            return
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
