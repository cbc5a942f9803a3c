"""The CI side of the sandbox: NoiseReduction jobs, their processing, and their callbacks."""

from __future__ import annotations

import logging
import tempfile
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests

from webhook.dev.sandbox.audio import AudioError, reduce_noise
from webhook.dev.sandbox.results import (
    CallbackShape,
    encoded,
    media_info,
    resolve_output,
    shaped,
    workflow_finish,
)
from webhook.dev.sandbox.store import NoSuchKey, ObjectStore, read_chunks
from webhook.dev.sandbox.submission import MediaJob, ci_time
from webhook.models import JobState

log = logging.getLogger(__name__)

_CALLBACK_RETRY_DELAYS = (0.2, 0.5, 1.0)  # seconds to wait before each retry of a failed callback
_CALLBACK_TIMEOUT = 10.0


@dataclass(frozen=True)
class SentCallback:
    """One callback delivery, after its retries (a TDMQ one: ``url`` ``tdmq://<region>/<queue>``, 200 once queued)."""

    job_id: str
    url: str
    format: str  # "json" or "xml"
    status_code: int | None  # of the last attempt; None when no response came back
    body: bytes
    attempts: int


class MediaJobs:
    """Runs jobs in background threads against ``store``, and POSTs their callbacks from threads of their own.

    As in CI, a callback URL that is down (retried with waits) can hold up other callbacks at most,
    never the processing of other jobs.
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        job_delay: float = 0.0,
        tdmq: Callable[[str, str], str] | None = None,
        callback_shape: CallbackShape = CallbackShape.FULL,
    ) -> None:
        self.callback_shape = callback_shape
        """How callbacks state the job's locations (see :class:`~webhook.dev.sandbox.results.CallbackShape`)."""
        self.reports_results = True
        """Whether jobs report what they wrote (``MediaResult``, ``MediaInfo``), as current CI does."""
        self._store = store
        self._job_delay = job_delay
        self._tdmq = tdmq  # puts a message on a CMQ queue: (queue name, body) -> msgId
        self._jobs: dict[str, MediaJob] = {}
        self._sent: list[SentCallback] = []
        self._lock = threading.Lock()
        self._sent_changed = threading.Condition(self._lock)
        self._closing = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sandbox-ci")
        self._callbacks = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sandbox-callback")

    def submit(self, job: MediaJob) -> dict[str, Any]:
        """Queue ``job``; return its ``JobsDetail`` as submitted."""
        with self._lock:
            self._jobs[job.job_id] = job
            detail = job.detail(self.reports_results)
        self._pool.submit(self._run, job)
        return detail

    def describe(self, bucket: str, region: str, job_ids: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
        """The details of the jobs of ``bucket`` in ``region`` among ``job_ids``, and the ids that are not
        among them: as in CI, a job is known only through the bucket (and region) it was submitted to."""
        details, missing = [], []
        with self._lock:
            for job_id in job_ids:
                job = self._jobs.get(job_id)
                if job is not None and job.bucket == bucket and job.region == region:
                    details.append(job.detail(self.reports_results))
                else:
                    missing.append(job_id)
        return details, missing

    def details(self, bucket: str) -> list[dict[str, Any]]:
        """The details of every job of ``bucket``, in the order they were submitted."""
        with self._lock:
            return [job.detail(self.reports_results) for job in self._jobs.values() if job.bucket == bucket]

    @property
    def callbacks_sent(self) -> list[SentCallback]:
        with self._lock:
            return list(self._sent)

    def wait_for_callbacks(self, n: int, timeout: float) -> list[SentCallback]:
        """Block until at least ``n`` callbacks were sent; raise :class:`TimeoutError` after ``timeout`` s."""
        with self._sent_changed:
            if not self._sent_changed.wait_for(lambda: len(self._sent) >= n, timeout):
                raise TimeoutError(f"{len(self._sent)} of {n} callbacks were sent within {timeout} s")
            return list(self._sent)

    def close(self) -> None:
        """Drop queued jobs and callbacks, cut delays and retry waits short, and wait for running ones."""
        self._closing.set()
        # Jobs first: a job that is finishing still hands its callback over.
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._callbacks.shutdown(wait=True, cancel_futures=True)

    def _run(self, job: MediaJob) -> None:
        with self._lock:
            job.state, job.start_time = JobState.RUNNING, ci_time()
        if self._closing.wait(self._job_delay):
            return
        try:
            self._reduce_noise(job)
        except NoSuchKey:
            self._finish(job, "InputObjectNotExist", f"the input object {job.input_key!r} does not exist")
        except AudioError as exc:
            self._finish(job, "InvalidInputFile", str(exc))
        except Exception as exc:  # a job must end Failed, never stay Running
            log.exception("sandbox job %s failed", job.job_id)
            self._finish(job, "InternalError", f"{type(exc).__name__}: {exc}")
        else:
            self._finish(job)
        if job.callback_url or job.callback_mq:
            self._callbacks.submit(self._send_callback, job)

    def _reduce_noise(self, job: MediaJob) -> None:
        _, source = self._store.open(job.bucket, job.input_key)
        key = resolve_output(job.output_key, job.input_key, job.format)
        with source, tempfile.TemporaryFile() as target:
            reduce_noise(source, target, int(job.sample_rate) if job.sample_rate else None)
            target.seek(0)
            written = self._store.put(job.output_bucket, key, read_chunks(target), "audio/wav")
            target.seek(0)
            info = media_info(target, written.size)
        with self._lock:
            job.written_key, job.written_md5, job.written_info = key, written.md5, info

    def _finish(self, job: MediaJob, code: str = "", message: str = "") -> None:
        """Mark ``job`` Success, or Failed with the error ``code`` and ``message``."""
        with self._lock:
            job.state = JobState.FAILED if code else JobState.SUCCESS
            job.code, job.message, job.end_time = code or "Success", message, ci_time()

    def _send_callback(self, job: MediaJob) -> None:
        with self._lock:
            event = {
                "EventName": "TaskFinish",
                "JobsDetail": shaped(job.detail(self.reports_results), self.callback_shape),
            }
        body, content_type = encoded(event, job.callback_format)
        status: int | None = None
        attempts = 0
        if job.callback_mq is not None:
            url = f"tdmq://{job.callback_mq.region}/{job.callback_mq.name}"
            status, attempts = self._enqueue(job, body), 1
        else:
            url = job.callback_url
            for delay in (*_CALLBACK_RETRY_DELAYS, None):
                attempts += 1
                status = _post(url, body, content_type)
                if (status is not None and 200 <= status < 300) or delay is None or self._closing.wait(delay):
                    break
        sent = SentCallback(job.job_id, url, job.callback_format, status, body, attempts)
        with self._sent_changed:
            self._sent.append(sent)
            self._sent_changed.notify_all()

    def finish_workflow(self, url: str, job_ids: list[str], callback_format: str = "xml") -> SentCallback:
        """POST ``url`` the ``WorkflowFinish`` of a workflow run whose tasks were the jobs ``job_ids``."""
        with self._lock:
            first, details = (
                self._jobs[job_ids[0]],
                [self._jobs[job_id].detail(self.reports_results) for job_id in job_ids],
            )
        run_id = "i" + uuid.uuid4().hex
        body, content_type = encoded(workflow_finish(run_id, first.bucket, first.input_key, details), callback_format)
        sent = SentCallback(run_id, url, callback_format, _post(url, body, content_type), body, 1)
        with self._sent_changed:
            self._sent.append(sent)
            self._sent_changed.notify_all()
        return sent

    def _enqueue(self, job: MediaJob, body: bytes) -> int | None:
        assert job.callback_mq is not None
        if self._tdmq is None:
            log.warning("sandbox job %s: no TDMQ to send its callback to", job.job_id)
            return None
        try:
            self._tdmq(job.callback_mq.name, body.decode())
        except Exception:
            log.exception("sandbox job %s: its callback could not be queued", job.job_id)
            return None
        return 200


def _post(url: str, body: bytes, content_type: str) -> int | None:
    try:
        with requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=_CALLBACK_TIMEOUT) as r:
            return r.status_code
    except requests.RequestException as exc:
        log.warning("sandbox callback to %s failed: %s", url, exc)
        return None
