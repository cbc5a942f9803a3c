"""What a worker does with one claim: verify the job, fetch its object, deliver it to each sink,
and record every outcome; a failure costs only the tasks it happened to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from qcloud_cos import CosS3Client

from webhook.ci.client import signer
from webhook.ci.fetch import FetchError, describe_object, presigned_url
from webhook.ci.verify import (
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
from webhook.config import Settings
from webhook.ledger import (
    Attempt,
    Claim,
    Delivery,
    DeliveryClaim,
    Ledger,
    Task,
    Trying,
    VerifyClaim,
    Version,
    utcnow,
)
from webhook.models import FetchedFile, Job, ObjectLocation, Outcome, Step, job_from_json
from webhook.retry import RetryPolicy, backoff_delay, why_over
from webhook.sinks import DeliveryError, NotificationSink, Sink
from webhook.sinks.config import SinkSpec
from webhook.sinks.events import build_event
from webhook.telemetry import metrics
from webhook.telemetry.logs import fields
from webhook.worker.liveness import SHUTDOWN, Leases, Shutdown
from webhook.worker.staging import Staging

log = logging.getLogger("webhook.worker")

ClientFactory = Callable[[str], CosS3Client]


class Steps:
    """One claim at a time per call; a worker calls :meth:`run` from several threads, each with its own claim."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        specs: dict[str, SinkSpec],
        sinks: dict[str, Sink],
        client_for_region: ClientFactory,
        worker_id: str,
        staging: Staging,
        shutdown: Shutdown,
        leases: Leases,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.specs = specs
        self.sinks = sinks
        self.client_for_region = client_for_region
        self.worker_id = worker_id
        self.staging = staging
        self.shutdown = shutdown
        self.leases = leases
        self.allow = Allowlist(settings.allowed_buckets, settings.allowed_regions, settings.allowed_tags)

    def run(self, claim: Claim) -> None:
        """Work on ``claim`` until each of its tasks has an outcome recorded; a job that passes
        verification goes on to its deliveries, leased to this worker when it was accepted."""
        if (deliveries := self._run_one(claim)) is not None:
            self._run_one(deliveries)

    def _run_one(self, claim: Claim) -> DeliveryClaim | None:
        started = Trying(Step.VERIFY if isinstance(claim, VerifyClaim) else Step.DELIVER)
        with self.leases.kept([t.id for t in claim.tasks]):
            try:
                match claim:
                    case VerifyClaim():
                        return self._verify(claim)
                    case DeliveryClaim():
                        self._deliver(claim)
            except Exception as exc:  # a failure no step foresaw stays with these tasks, not the worker
                log.exception("step failed unexpectedly", extra={"job_id": claim.tasks[0].job_id})
                for task in claim.tasks:
                    self._failed(
                        task, claim, self._error_text(exc), self._policy(task), started, code=type(exc).__name__
                    )
        return None

    # -- steps -----------------------------------------------------------------------------

    def _verify(self, claim: VerifyClaim) -> DeliveryClaim | None:
        task = claim.task
        trying = Trying(Step.VERIFY)
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
                        self._failed(task, claim, str(exc), self.settings.verify_retry, trying)
                        return None
                verdict = decide(job, reported[where], self.allow)
            judged.append((version, job, verdict))
        rejected = {version.id: verdict.reason for version, _, verdict in judged if isinstance(verdict, Reject)}
        if not any(job for _, job, _ in judged):
            # Nothing CI could be asked about: a dead task to look at, not a verdict on the job.
            reasons = "; ".join(dict.fromkeys(rejected.values()))
            self._failed(task, claim, reasons, self._policy(task), trying, final="nothing readable to verify")
            return None
        match overall([verdict for _, _, verdict in judged]):
            case Accept():
                version, job = next((v, j) for v, j, verdict in judged if isinstance(verdict, Accept) and j)
                sinks = sorted(name for name, spec in self.specs.items() if spec.accepts(job))
                tried = [trying.ended(Outcome.OK)]
                metrics.attempted(tried, claim.received_at)
                lease = self.settings.lease_seconds
                deliveries = self.ledger.queue.accept_and_claim(
                    claim, self.worker_id, sinks, version, job, rejected, tried, lease
                )
                log.info("verified state=%s deliveries=%s", job.state, ",".join(sinks), extra=fields(job))
                return deliveries
            case Reject(reason):
                tried = [trying.ended(Outcome.REJECTED, reason)]
                metrics.attempted(tried, claim.received_at)
                self.ledger.queue.reject(task, self.worker_id, reason, rejected, tried)
                log.warning("rejected: %s", reason, extra=fields(task))
            case Wait(reason):
                self._failed(task, claim, reason, self.settings.verify_retry, trying)
        return None

    def _deliver(self, claim: DeliveryClaim) -> None:
        try:
            job = job_from_json(claim.detail)
        except ValueError as exc:
            for delivery in claim.deliveries:
                trying = Trying(Step.DELIVER, delivery.sink)
                error = f"unreadable job row: {exc}"
                self._failed(delivery, claim, error, self._policy(delivery), trying, final="unreadable")
            return
        for unknown in (d for d in claim.deliveries if d.sink not in self.sinks):
            error = f"sink {unknown.sink} is not configured in this worker"
            self._failed(unknown, claim, error, self.settings.retry, Trying(Step.DELIVER, unknown.sink))
        # Storage sinks first: a notification may point at the copy one of them makes.
        deliveries = sorted(
            (d for d in claim.deliveries if d.sink in self.sinks),
            key=lambda d: isinstance(self.sinks[d.sink], NotificationSink),
        )
        fetched: FetchedFile | None = None
        fetch_attempts: list[Attempt] = []  # recorded with the first delivery's outcome
        if job.succeeded and deliveries:
            assert job.output is not None  # verification refuses a success without output
            fetching = Trying(Step.FETCH)
            try:
                fetched = self._fetch(job, job.output, any(self.sinks[d.sink].needs_bytes(job) for d in deliveries))
            except Exception as exc:
                # One delay for all: the deliveries stay due together, so the next try fetches once.
                together = max(backoff_delay(d.attempts, self._policy(d)) for d in deliveries)
                error = self._error_text(exc)
                for n, delivery in enumerate(deliveries):
                    trying = Trying(Step.DELIVER, delivery.sink)
                    also = [fetching] if n == 0 else []
                    self._failed(delivery, claim, error, self._policy(delivery), trying, also=also, delay=together)
                return
            fetch_attempts.append(fetching.ended(Outcome.OK))
            log.info("fetched=%s %s bytes=%d", bool(fetched.path), job.output.key, fetched.size, extra=fields(job))
        stored = {name: self.sinks[name] for name in claim.delivered_to if name in self.sinks}
        retrying = False
        for delivery in deliveries:
            outcome = self._deliver_to(delivery, claim, job, fetched, stored, fetch_attempts)
            fetch_attempts = []
            if outcome is Outcome.OK:
                stored[delivery.sink] = self.sinks[delivery.sink]
            retrying = retrying or outcome in (Outcome.RETRY, Outcome.ABANDONED)
        if fetched is not None and fetched.path is not None and not retrying:
            self.staging.release(job.job_id)

    def _deliver_to(
        self,
        delivery: Delivery,
        claim: DeliveryClaim,
        job: Job,
        fetched: FetchedFile | None,
        stored: dict[str, Sink],
        recorded: Sequence[Attempt],
    ) -> Outcome:
        """One sink's delivery; ``stored`` are the sinks that already have the job's file."""
        sink = self.sinks[delivery.sink]
        trying = Trying(Step.DELIVER, delivery.sink)
        if self.shutdown.abandoning.is_set():
            return self._failed(delivery, claim, "not started", self._policy(delivery), trying, recorded=recorded)
        try:
            location = None
            if fetched and isinstance(sink, NotificationSink):
                location = sink.locate(job, stored, self._presign_source)
            sink.deliver(build_event(job, delivery.sink, fetched, location))
        except DeliveryError as exc:
            final = "refused permanently" if exc.permanent else None
            return self._failed(
                delivery,
                claim,
                exc.message,
                self._policy(delivery),
                trying,
                recorded=recorded,
                retry_after=exc.retry_after,
                final=final,
                code=exc.code,
            )
        except Exception as exc:  # a sink's own bug must cost its delivery an attempt, not the worker
            log.exception("failed unexpectedly", extra=fields(delivery))
            error = self._error_text(exc)
            return self._failed(
                delivery, claim, error, self._policy(delivery), trying, recorded=recorded, code=type(exc).__name__
            )
        done = [*recorded, trying.ended(Outcome.OK)]
        metrics.attempted(done, claim.received_at)
        if self.ledger.queue.complete(delivery, self.worker_id, done):
            log.info("delivered attempt=%d", delivery.attempts, extra=fields(delivery))
        else:
            log.warning("delivered but the lease was lost", extra=fields(delivery))
        return Outcome.OK

    def _fetch(self, job: Job, where: ObjectLocation, bytes_needed: bool) -> FetchedFile:
        client = self.client_for_region(where.region)
        if bytes_needed:
            return self.staging.fetch(client, job.job_id, where)
        return describe_object(client, where)

    def _error_text(self, exc: BaseException) -> str:
        """What is recorded on the task: our own errors' messages, else the type and message, secrets removed."""
        text = str(exc) if isinstance(exc, VerifyError | FetchError) else f"{type(exc).__name__}: {exc}"
        return self.settings.redact(text)[:500]

    def _presign_source(self, where: ObjectLocation, seconds: int) -> str:
        return presigned_url(signer(self.settings.secret_id, self.settings.secret_key, where.region), where, seconds)

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
        tried: Trying,
        *,
        also: Sequence[Trying] = (),
        recorded: Sequence[Attempt] = (),
        retry_after: float | None = None,
        final: str | None = None,
        delay: float | None = None,
        code: str = "",
    ) -> Outcome:
        """Schedule the task again with backoff, or mark it dead once retrying cannot help.

        ``final`` says why retrying cannot help at all (e.g. "refused permanently"); the dead
        task's error then says so, as it says when the attempts or ``max_age`` ran out. ``tried``
        and ``also`` (a fetch the task depended on) are recorded with this outcome, after the
        attempts already ``recorded``.
        """
        if self.shutdown.abandoning.is_set():
            # Cut off by a shutdown: due again at once, for a worker that is not stopping.
            error = f"{error} ({SHUTDOWN})"
            attempts = [*recorded, *(t.ended(Outcome.ABANDONED, error, code) for t in (*also, tried))]
            metrics.attempted(attempts, claim.received_at)
            self.ledger.queue.retry_later(task, self.worker_id, error, 0.0, attempts)
            log.warning("attempt %d abandoned at shutdown: %s", task.attempts, error, extra=fields(task, step=True))
            return Outcome.ABANDONED
        over = why_over(task.attempts, policy, (utcnow() - claim.received_at).total_seconds(), final)
        if over is not None:
            error = f"{error} ({over})"
        outcome = Outcome.DEAD if over is not None else Outcome.RETRY
        attempts = [*recorded, *(t.ended(outcome, error, code) for t in (*also, tried))]
        metrics.attempted(attempts, claim.received_at)
        if over is not None:
            self.ledger.queue.give_up(task, self.worker_id, error, attempts)
            log.error("dead after %d attempts: %s", task.attempts, error, extra=fields(task, step=True))
            return outcome
        if delay is None:
            delay = backoff_delay(task.attempts, policy, retry_after)
        self.ledger.queue.retry_later(task, self.worker_id, error, delay, attempts)
        log.warning("attempt %d failed, retry in %.1fs: %s", task.attempts, delay, error, extra=fields(task, step=True))
        return outcome
