"""A whole deployment in one test process: sandbox, receiver on a real socket, sinks, worker."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from support.receiver import ReceivedRequest, Receiver
from support.waiting import wait_for
from webhook.ci.submit import submit_noise_reduction
from webhook.config import Settings
from webhook.dev.sandbox import Sandbox, noisy_wav
from webhook.ledger import Ledger, LedgerError
from webhook.models import ObjectLocation
from webhook.retry import RetryPolicy
from webhook.worker.runtime import Worker

REGION = "ap-guangzhou"
BUCKET = "audio-1250000000"
TOKEN = "test-token-0123456789abcdef"
HTTP_KEY = bytes(range(32))
HTTP_SECRET = "whsec_" + base64.b64encode(HTTP_KEY).decode()
DONE = {"delivered", "failed", "rejected", "dead", "ignored"}  # statuses a job ends in
FAST = RetryPolicy(max_attempts=4, backoff_base=0.01, backoff_cap=0.05)


def pipeline_settings(database_url: str, sandbox: Sandbox, sink_dir: Path, http_url: str) -> Settings:
    return sandbox.settings(
        BUCKET,
        REGION,
        database_url=database_url,
        callback_tokens=(TOKEN,),
        sink_dir=str(sink_dir),
        http_sink_url=http_url,
        http_sink_secret=HTTP_SECRET,
        http_sink_timeout=5,
        # Most pipeline tests check the audio bytes end to end: the mode that pushes them.
        http_sink_mode="multipart",
        retry=FAST,
        verify_retry=FAST.model_copy(update={"max_attempts": 50}),
        lease_seconds=60,
        poll_interval=0.05,
        temp_dir=str(sink_dir.parent / "staging"),
    )


@dataclass
class Pipeline:
    settings: Settings
    ledger: Ledger
    sandbox: Sandbox
    receiver_url: str
    http: Receiver
    sink_dir: Path

    @property
    def callback_url(self) -> str:
        return f"{self.receiver_url}/callback/{TOKEN}"

    def worker(self) -> Worker:
        return Worker.from_settings(self.settings, self.ledger)

    def run_job(self, config: Path, user_data: str = "order-42") -> tuple[str, str]:
        """With the sinks the file ``config`` declares too: submit a job and work it to its end.

        Returns the JobId and the status it ended in; the worker's sinks are closed afterwards.
        """
        settings = self.settings.replace(config_path=str(config))
        job_id = self.submit(self.upload_input(), user_data=user_data)
        self.sandbox.wait_for_callbacks(1, timeout=20)
        worker = Worker.from_settings(settings, self.ledger)
        try:
            return job_id, self.drain(worker, job_id, DONE)
        finally:
            worker.close()

    def upload_input(self, key: str = "in/noisy.wav", seconds: float = 0.5) -> str:
        path = self.sink_dir.parent / "input.wav"
        noisy_wav(path, seconds)
        with path.open("rb") as body:
            self.sandbox.client(REGION).put_object(Bucket=BUCKET, Body=body, Key=key)
        return key

    def submit(
        self,
        input_key: str,
        output_key: str = "out/denoised.wav",
        callback_format: str = "JSON",
        callback_url: str | None = None,
        user_data: str = "order-42",
    ) -> str:
        """Submit a NoiseReduction job through the SDK; returns its JobId."""
        return submit_noise_reduction(
            self.sandbox.client(REGION),
            input_key,
            ObjectLocation(BUCKET, REGION, output_key),
            callback_url or self.callback_url,
            callback_format,
            user_data,
        )

    def post_callback(self, body: bytes | dict[str, Any]) -> requests.Response:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        return requests.post(self.callback_url, data=data, timeout=10)

    def status(self, job_id: str) -> str:
        try:
            return self.ledger.views.show_job(job_id).status
        except LedgerError:
            return ""

    def wait_until(self, condition: Callable[[], bool], timeout: float = 20, what: str = "condition") -> None:
        wait_for(condition, what, timeout)

    def drain(self, worker: Worker, job_id: str, until: set[str], timeout: float = 20) -> str:
        """Run the worker until the job reaches one of ``until`` (retries become due on their own)."""
        deadline = time.monotonic() + timeout
        while (status := self.status(job_id)) not in until:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} stuck at {status!r}: {self.ledger.views.show_job(job_id).to_dict()}"
                )
            if not run_one(worker):
                time.sleep(0.01)
        return status

    def output_bytes(self, key: str = "out/denoised.wav") -> bytes:
        return self.sandbox.object_path(BUCKET, key).read_bytes()


def run_one(worker: Worker) -> bool:
    """Claim one unit of due work and run it through the worker's pipeline in this thread, as its
    claim loop would; False when nothing is due."""
    worker.heartbeat.beat()  # registered, so other workers leave its lease alone
    claim = worker.ledger.queue.claim(worker.worker_id, worker.settings.lease_seconds)
    if claim is None:
        return False
    worker.pipeline.run(claim)
    return True


@contextmanager
def working(settings: Settings, ledger: Ledger) -> Iterator[Worker]:
    """A worker running in a thread meanwhile, as ``cos-webhook worker`` would beside the code under test."""
    worker = Worker.from_settings(settings, ledger)
    thread = threading.Thread(target=worker.run, name="test-worker", daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stopping.set()
        thread.join(timeout=30)
        worker.close()


def multipart_file(request: ReceivedRequest) -> tuple[dict[str, Any], bytes | None]:
    """The metadata document and the decoded audio of an http-sink request (its first file)."""
    document, audio = multipart_files(request)
    return document, audio[0] if audio else None


def multipart_files(request: ReceivedRequest) -> tuple[dict[str, Any], tuple[bytes, ...]]:
    """The metadata document and every decoded audio file of an http-sink request, in the order the
    document lists them: parts ``file``, ``file.2``, ``file.3``…, and no other part."""
    form, files = request.form()
    names = ["file", *(f"file.{n}" for n in range(2, len(files) + 1))][: len(files)]
    assert sorted(files) == sorted(names), f"unexpected parts {sorted(files)}"
    return json.loads(form["metadata"]), tuple(base64.b64decode(files[name].read()) for name in names)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that configures a worker process like ``settings``."""
    assert settings.cos_endpoint is not None
    endpoint = settings.cos_endpoint
    return {
        "WEBHOOK_DATABASE_URL": settings.database_url,
        "WEBHOOK_CALLBACK_TOKEN": settings.callback_tokens[0],
        "WEBHOOK_ALLOWED_BUCKETS": ",".join(settings.allowed_buckets),
        "COS_SECRET_ID": settings.secret_id,
        "COS_SECRET_KEY": settings.secret_key,
        "COS_REGION": settings.region,
        "WEBHOOK_COS_ENDPOINT": f"{endpoint.scheme}://{endpoint.host}:{endpoint.port}",
        "WEBHOOK_SINK_DIR": settings.sink_dir,
        "WEBHOOK_HTTP_SINK_URL": settings.http_sink_url,
        "WEBHOOK_HTTP_SINK_SECRET": settings.http_sink_secret,
        "WEBHOOK_HTTP_SINK_MODE": settings.http_sink_mode,
        "WEBHOOK_MAX_ATTEMPTS": str(settings.retry.max_attempts),
        "WEBHOOK_BACKOFF_BASE": str(settings.retry.backoff_base),
        "WEBHOOK_BACKOFF_CAP": str(settings.retry.backoff_cap),
        "WEBHOOK_POLL_INTERVAL": str(settings.poll_interval),
    }


def forged(job_id: str, output_key: str = "out/denoised.wav", **changes: object) -> dict[str, object]:
    detail: dict[str, object] = {
        "JobId": job_id,
        "Tag": "NoiseReduction",
        "State": "Success",
        "Code": "Success",
        "Input": {"BucketId": BUCKET, "Object": "in/noisy.wav", "Region": REGION},
        "Operation": {
            "Output": {"Bucket": BUCKET, "Object": output_key, "Region": REGION},
            "UserData": "order-42",
        },
    }
    detail.update(changes)
    return {"EventName": "TaskFinish", "JobsDetail": detail}
