"""What a worker does with one claim: verify the job, fetch the objects CI wrote for it, deliver
them to each sink; a failure costs only the tasks it happened to.

The steps decide what became of each task (:mod:`webhook.worker.outcomes`) and hand each
outcome, as soon as it is decided, to the one :class:`~webhook.worker.outcomes.Recorder`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Unpack

from webhook.ci.client import ClientFactory, signer_for
from webhook.ci.fetch import FetchError, describe_object, presigned_url
from webhook.ci.verify import (
    Accept,
    Allowlist,
    FoundAt,
    OutputUnknown,
    Place,
    Reject,
    Verdict,
    VerifyError,
    Wait,
    confirmed,
    decide,
    describe_job,
    overall,
    precheck,
    reported_md5,
    where_to_ask,
    written_outputs,
)
from webhook.config import Settings
from webhook.ledger import Attempt, Claim, Delivery, DeliveryClaim, Task, Trying, VerifyClaim, Version
from webhook.models import Job, JobFile, ObjectLocation, Outcome, Step, job_from_json
from webhook.retry import RetryPolicy, backoff_delay
from webhook.sinks import DeliveryError, NotificationSink, Sink
from webhook.sinks.config import SinkSpec
from webhook.sinks.events import build_event
from webhook.telemetry.logs import fields
from webhook.worker.lanes import VERIFY, Held, Lanes
from webhook.worker.liveness import Leases
from webhook.worker.outcomes import (
    Abandoned,
    Accepted,
    Delivered,
    Failed,
    FailureDetails,
    Recorder,
    Rejected,
    RetryLater,
    TaskOutcome,
    after_failure,
)
from webhook.worker.services import Shutdown
from webhook.worker.staging import Staging

log = logging.getLogger("webhook.worker")


class Pipeline:
    """One claim at a time per call; a worker calls :meth:`run` from several threads, each with its own claim."""

    def __init__(
        self,
        settings: Settings,
        recorder: Recorder,
        specs: dict[str, SinkSpec],
        sinks: dict[str, Sink],
        client_for_region: ClientFactory,
        staging: Staging,
        shutdown: Shutdown,
        leases: Leases,
        lanes: Lanes,
    ) -> None:
        self.settings = settings
        self.recorder = recorder
        self.specs = specs
        self.sinks = sinks
        self.client_for_region = client_for_region
        self.staging = staging
        self.shutdown = shutdown
        self.leases = leases
        self.lanes = lanes
        self.allow = Allowlist(settings.allowed_buckets, settings.allowed_regions, settings.allowed_tags)
        self.found_at = FoundAt()

    def run(self, claim: Claim, held: Held | None = None) -> None:
        """Work on ``claim`` until each of its tasks has an outcome recorded; a job that passes
        verification goes on to its deliveries to the sinks with a free slot, leased to this worker
        when it was accepted (the others wait for a claim of their lane).

        ``held``: the slots the claim loop took for it (by default taken here); each is given back
        as soon as its task's outcome is recorded, any left when the claim ends.
        """
        held = held or self.lanes.hold(claim)
        try:
            if (deliveries := self._run_one(claim, held)) is not None:
                self._run_one(deliveries, held)
        finally:
            held.release_all()

    def _run_one(self, claim: Claim, held: Held) -> DeliveryClaim | None:
        started = Trying(Step.VERIFY if isinstance(claim, VerifyClaim) else Step.DELIVER)
        with self.leases.kept([t.id for t in claim.tasks]):
            if claim.unreadable:  # a row no step can use: nothing to try, nothing to wait for
                for task in claim.tasks:
                    dead = self._failed(task, claim, claim.unreadable, self._policy(task), started, final="unreadable")
                    self.recorder.record(dead, claim.received_at)
                    held.release(_lane(task))
                return None
            try:
                match claim:
                    case VerifyClaim():
                        return self._verified(claim, held)
                    case DeliveryClaim():
                        for outcome in self._deliver(claim):
                            self.recorder.record(outcome, claim.received_at)
                            held.release(_lane(outcome.task))
            except Exception as exc:  # a failure no step foresaw stays with these tasks, not the worker
                log.exception("step failed unexpectedly", extra={"job_id": claim.tasks[0].job_id})
                for task in claim.tasks:
                    error, code = self._error_text(exc), type(exc).__name__
                    failed = self._failed(task, claim, error, self._policy(task), started, code=code)
                    self.recorder.record(failed, claim.received_at)
        return None

    def _verified(self, claim: VerifyClaim, held: Held) -> DeliveryClaim | None:
        """Verify and record the outcome; an accepted job's deliveries to the sinks with a free slot
        come back leased, with those slots held."""
        outcome = self._verify(claim)
        room = held.take(outcome.sinks) if isinstance(outcome, Accepted) else ()
        deliveries = self.recorder.record(outcome, claim.received_at, room)
        held.release(VERIFY)
        leased = {d.sink for d in deliveries.deliveries} if deliveries is not None else set()
        for sink in set(room) - leased:  # its breaker is open, or the lease was lost
            held.release(sink)
        return deliveries

    # -- steps -----------------------------------------------------------------------------

    def _verify(self, claim: VerifyClaim) -> TaskOutcome:
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
                try:
                    found, asked = self._find(job, reported)
                except VerifyError as exc:
                    return self._failed(task, claim, str(exc), self.settings.verify_retry, trying)
                verdict = decide(job, found, self.allow, asked)
                if isinstance(verdict, Accept) and found is not None:
                    job = confirmed(job, found)  # what is delivered is CI's account of the job
            judged.append((version, job, verdict))
        rejected = {version.id: verdict.reason for version, _, verdict in judged if isinstance(verdict, Reject)}
        if not any(job for _, job, _ in judged):
            # Nothing CI could be asked about: a dead task to look at, not a verdict on the job.
            reasons = "; ".join(dict.fromkeys(rejected.values()))
            return self._failed(task, claim, reasons, self._policy(task), trying, final="nothing readable to verify")
        match overall([verdict for _, _, verdict in judged]):
            case Accept():
                version, job = next((v, j) for v, j, verdict in judged if isinstance(verdict, Accept) and j)
                if job.succeeded:
                    try:
                        # From here on the job's output is the (first) object CI wrote, not the name
                        # submitted; its deliveries find every object it wrote with written_outputs.
                        job = replace(job, output=written_outputs(job)[0])
                    except OutputUnknown as exc:
                        final = "CI names no file to fetch"
                        return self._failed(task, claim, str(exc), self._policy(task), trying, final=final)
                sinks = tuple(sorted(name for name, spec in self.specs.items() if spec.accepts(job)))
                return Accepted(claim, (trying.ended(Outcome.OK),), version, job, sinks, rejected)
            case Reject(reason):
                return Rejected(task, (trying.ended(Outcome.REJECTED, reason),), reason, rejected)
            case Wait(reason):
                return self._failed(task, claim, reason, self.settings.verify_retry, trying)
        raise AssertionError("overall() gives Accept, Reject or Wait")

    def _find(self, job: Job, reported: dict[Place, Job | None]) -> tuple[Job | None, tuple[Place, ...]]:
        """CI's answer for ``job`` from the first place that knows it, and the places there were to ask.

        A callback that states its bucket and region has one place; one that leaves them out is
        searched among the allowlist, where this job was last found first. ``reported`` keeps each
        place's answer for the other versions of the same claim.
        """
        places = where_to_ask(job, self.allow)
        if (last := self.found_at.get(job.job_id)) in places:
            places = (last, *(place for place in places if place != last))
        for place in places:
            if place not in reported:
                region, bucket = place
                reported[place] = describe_job(self.client_for_region(region), bucket, job.job_id)
            if (answer := reported[place]) is not None:
                self.found_at.remember(job.job_id, place)
                return answer, places
        return None, places

    def _deliver(self, claim: DeliveryClaim) -> Iterator[TaskOutcome]:
        """Each delivery's outcome in turn, each recorded before the next delivery starts."""
        try:
            job = job_from_json(claim.detail)
        except ValueError as exc:
            for delivery in claim.deliveries:
                trying = Trying(Step.DELIVER, delivery.sink)
                error = f"unreadable job row: {exc}"
                yield self._failed(delivery, claim, error, self._policy(delivery), trying, final="unreadable")
            return
        for unknown in (d for d in claim.deliveries if d.sink not in self.sinks):
            error = f"sink {unknown.sink} is not configured in this worker"
            yield self._failed(unknown, claim, error, self.settings.retry, Trying(Step.DELIVER, unknown.sink))
        # Storage sinks first: a notification may point at the copy one of them makes.
        deliveries = sorted(
            (d for d in claim.deliveries if d.sink in self.sinks),
            key=lambda d: isinstance(self.sinks[d.sink], NotificationSink),
        )
        files: tuple[JobFile, ...] = ()
        fetch_attempts: list[Attempt] = []  # recorded with the first delivery's outcome
        if job.succeeded and deliveries:
            fetching = Trying(Step.FETCH)
            try:
                bytes_needed = any(self.sinks[d.sink].needs_bytes(job) for d in deliveries)
                files = self._fetch(job, bytes_needed)
            except Exception as exc:
                # Every file or none: a file that fails its check fails the attempt of every delivery,
                # with its error, and no sink gets the others. One delay for all: the deliveries stay
                # due together, so the next try fetches once (the files already staged are kept).
                together = max(backoff_delay(d.attempts, self._policy(d)) for d in deliveries)
                error = self._error_text(exc)
                retrying = False
                for n, delivery in enumerate(deliveries):
                    trying = Trying(Step.DELIVER, delivery.sink)
                    also = [fetching] if n == 0 else []
                    policy = self._policy(delivery)
                    failed = self._failed(delivery, claim, error, policy, trying, also=also, delay=together)
                    yield failed
                    retrying = retrying or isinstance(failed, RetryLater | Abandoned)
                self._release(job.job_id, claim, retrying)  # the files staged before the one that failed
                return
            fetch_attempts.append(fetching.ended(Outcome.OK))
        stored = {name: self.sinks[name] for name in claim.delivered_to if name in self.sinks}
        retrying = False
        for delivery in deliveries:
            outcome = self._deliver_to(delivery, claim, job, files, stored, fetch_attempts)
            fetch_attempts = []
            yield outcome
            if isinstance(outcome, Delivered):
                stored[delivery.sink] = self.sinks[delivery.sink]
            retrying = retrying or isinstance(outcome, RetryLater | Abandoned)
        if any(file.fetched.path is not None for file in files):
            self._release(job.job_id, claim, retrying)

    def _release(self, job_id: str, claim: DeliveryClaim, retrying: bool) -> None:
        """The job's staged files go once none of its deliveries is left to retry, in this claim or
        another; should two claims of one job end at once, each sees the other's delivery as still
        to come, and the staging budget evicts the files instead."""
        if not retrying and not claim.pending_elsewhere:
            self.staging.release(job_id)

    def _deliver_to(
        self,
        delivery: Delivery,
        claim: DeliveryClaim,
        job: Job,
        files: tuple[JobFile, ...],
        stored: dict[str, Sink],
        recorded: Sequence[Attempt],
    ) -> Delivered | Failed:
        """One sink's delivery of the job's ``files``; ``stored`` are the sinks that already have them."""
        sink = self.sinks[delivery.sink]
        trying = Trying(Step.DELIVER, delivery.sink)
        policy = self._policy(delivery)
        if self.shutdown.abandoning.is_set():
            return self._failed(delivery, claim, "not started", policy, trying, recorded=recorded)
        asked = False  # whether the sink itself was tried: only then does a failure count for its breaker
        try:
            if isinstance(sink, NotificationSink):
                files = tuple(replace(f, location=sink.locate(job, f, stored, self._presign_source)) for f in files)
            event, asked = build_event(job, delivery.sink, files), True
            sink.deliver(event)
        except DeliveryError as exc:
            final = "refused permanently" if exc.permanent else None
            return self._failed(
                delivery,
                claim,
                exc.message,
                policy,
                trying,
                recorded=recorded,
                retry_after=exc.retry_after,
                final=final,
                code=exc.code,
                sink_failed=asked and not exc.permanent,  # a sink that answers "never" is up
            )
        except Exception as exc:  # a sink's own bug must cost its delivery an attempt, not the worker
            log.exception("failed unexpectedly", extra=fields(delivery))
            error = self._error_text(exc)
            code = type(exc).__name__
            return self._failed(delivery, claim, error, policy, trying, recorded=recorded, code=code, sink_failed=asked)
        return Delivered(delivery, (*recorded, trying.ended(Outcome.OK)))

    def _fetch(self, job: Job, bytes_needed: bool) -> tuple[JobFile, ...]:
        """Every object CI wrote for ``job``, in its order, each checked against the MD5 CI reported
        for it: downloaded (staged) when a sink needs the bytes, else described."""
        written = written_outputs(job)
        files = []
        for number, where in enumerate(written, start=1):
            client = self.client_for_region(where.region)
            md5 = reported_md5(job, where.key)
            if bytes_needed:
                fetched = self.staging.fetch(client, job.job_id, where, md5, number)
            else:
                fetched = describe_object(client, where, md5=md5)
            log.info("fetched=%s %s bytes=%d", bool(fetched.path), where.key, fetched.size, extra=fields(job))
            files.append(JobFile(where, fetched, number, len(written)))
        return tuple(files)

    def _error_text(self, exc: BaseException) -> str:
        """What is recorded on the task: our own errors' messages, else the type and message, secrets removed."""
        text = str(exc) if isinstance(exc, VerifyError | FetchError) else f"{type(exc).__name__}: {exc}"
        return self.settings.redact(text)[:500]

    def _presign_source(self, where: ObjectLocation, seconds: int) -> str:
        return presigned_url(signer_for(self.settings, where.region), where, seconds)

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
        **details: Unpack[FailureDetails],
    ) -> Failed:
        """:func:`~webhook.worker.outcomes.after_failure` for a task of ``claim``; abandoned while the
        worker's shutdown is cutting off its work in hand."""
        abandoned = self.shutdown.abandoned if self.shutdown.abandoning.is_set() else None
        return after_failure(task, claim.received_at, error, policy, tried, abandoned=abandoned, **details)


def _lane(task: Task) -> str:
    return task.sink if isinstance(task, Delivery) else VERIFY
