"""``cos-webhook demo``: the whole path on one machine, through the sandbox, with no configuration."""

from __future__ import annotations

import filecmp
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from webhook.ci.client import client_for
from webhook.ci.submit import submit_noise_reduction
from webhook.dev.sandbox import Sandbox
from webhook.dev.sandbox.audio import noisy_wav
from webhook.ledger import Ledger, UnknownJob
from webhook.models import JobStatus, ObjectLocation
from webhook.web.app import create_app
from webhook.web.server import BackgroundServer
from webhook.worker.runtime import Worker

REGION = "ap-guangzhou"
BUCKET = "demo-1250000000"
INPUT_KEY = "input/noisy-demo.wav"
OUTPUT_KEY = "output/denoised-demo.wav"
FINAL = {JobStatus.DELIVERED, JobStatus.FAILED, JobStatus.REJECTED, JobStatus.DEAD, JobStatus.IGNORED}


def run_demo(callback_format: str, output: Path, seconds: float, timeout: float = 60.0) -> int:
    """Returns the process exit code: 0 only if the delivered bytes equal the sandbox's output object."""
    output = output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    steps: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="cos-webhook-demo-") as tmp:
        work = Path(tmp)
        sandbox = Sandbox(work / "sandbox").start()
        settings = sandbox.settings(
            BUCKET,
            REGION,
            database_url=f"sqlite:///{work / 'ledger.db'}",
            callback_tokens=(secrets.token_urlsafe(24),),
            sink_dir=str(output),
            poll_interval=0.1,
            log_level="WARNING",
        )
        ledger = Ledger(settings.database_url)
        ledger.migrate()
        worker = Worker.from_settings(settings, ledger)
        with BackgroundServer(create_app(settings, ledger), name="demo-receiver") as receiver, _running(worker):
            click.echo(f"sandbox   {sandbox.url} (COS and CI APIs)")
            click.echo(f"receiver  {receiver.url}/callback/<token>")
            client = client_for(settings, REGION)

            started = time.monotonic()
            source = work / "noisy.wav"
            noisy_wav(source, seconds)
            with source.open("rb") as body:
                client.put_object(Bucket=BUCKET, Body=body, Key=INPUT_KEY)
            steps.append(("generate and upload noisy WAV", time.monotonic() - started))

            mark = time.monotonic()
            job_id = submit_noise_reduction(
                client,
                INPUT_KEY,
                ObjectLocation(BUCKET, REGION, OUTPUT_KEY),
                f"{receiver.url}/callback/{settings.callback_tokens[0]}",
                callback_format,
                user_data="cos-webhook demo",
            )
            steps.append((f"submit NoiseReduction job {job_id}", time.monotonic() - mark))

            mark = time.monotonic()
            status = _wait_for(ledger, job_id, {JobStatus.RECEIVED, *FINAL, JobStatus.VERIFIED}, timeout)
            steps.append((f"denoise in sandbox, {callback_format.upper()} callback stored", time.monotonic() - mark))
            mark = time.monotonic()
            status = _wait_for(ledger, job_id, FINAL, timeout)
            steps.append(("verify with CI, fetch from COS, deliver", time.monotonic() - mark))

        view = ledger.views.show_job(job_id)
        audio, meta = output / f"{job_id}.wav", output / f"{job_id}.event.json"
        same = audio.exists() and filecmp.cmp(audio, sandbox.object_path(BUCKET, OUTPUT_KEY), shallow=False)
        sandbox.stop()
        ledger.dispose()

    click.echo("")
    for label, took in steps:
        click.echo(f"  {took * 1000:8.0f} ms  {label}")
    click.echo("")
    click.echo(f"job {job_id}: {status}{' (' + view.reason + ')' if view.reason else ''}")
    if status != JobStatus.DELIVERED or not same:
        click.echo("demo FAILED: the delivered file does not match the sandbox's output object", err=True)
        return 1
    click.echo(f"delivered audio:    {audio}  ({audio.stat().st_size} bytes, identical to the output object)")
    click.echo(f"delivered metadata: {meta}")
    return 0


def _wait_for(ledger: Ledger, job_id: str, wanted: set[JobStatus], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = ledger.views.show_job(job_id).status
        except UnknownJob:
            status = ""
        if status in wanted:
            return status
        time.sleep(0.05)
    raise click.ClickException(f"job {job_id} did not reach {sorted(wanted)} within {timeout:.0f}s")


@contextmanager
def _running(worker: Worker) -> Iterator[None]:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        worker.stopping.set()
        thread.join()
