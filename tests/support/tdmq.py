"""TDMQ for the tests: the sandbox's CMQ as a consumer's queue, consumers in a thread or a process."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import xmltodict

from support.pipeline import BUCKET, REGION
from support.processes import BIN, ROOT, procfile
from webhook.ci.submit import submit_noise_reduction
from webhook.dev.sandbox import Sandbox
from webhook.intake.consumer import Consumer
from webhook.intake.tdmq import CmqClient
from webhook.ledger import Ledger
from webhook.ledger.schema import callbacks, jobs, versions
from webhook.models import ObjectLocation
from webhook.retry import RetryPolicy

QUEUE = "cos-webhook-callbacks"
MQ = {"MqRegion": "gz", "MqMode": "Queue", "MqName": QUEUE}
FAST = RetryPolicy(backoff_base=0.05, backoff_cap=0.2)


def tdmq_env(sandbox: Sandbox, queue: str = QUEUE) -> dict[str, str]:
    """What points ``cos-webhook consume`` (or ``submit``) at the sandbox's CMQ."""
    return {"WEBHOOK_TDMQ_ENDPOINT": sandbox.url, "WEBHOOK_TDMQ_REGION": "gz", "WEBHOOK_TDMQ_QUEUE": queue}


def client(sandbox: Sandbox) -> CmqClient:
    return CmqClient(sandbox.url, sandbox.secret_id, sandbox.secret_key)


def consumer(sandbox: Sandbox, ledger: Ledger, *, batch: int = 16, wait: int = 1) -> Consumer:
    return Consumer(
        client(sandbox), ledger, [QUEUE], frozenset({"NoiseReduction"}), batch=batch, wait=wait, patience=FAST
    )


@contextmanager
def consuming(running: Consumer) -> Iterator[Consumer]:
    """``running`` consumes in a thread meanwhile, as ``cos-webhook consume`` would."""
    thread = threading.Thread(target=running.run, name="test-consumer", daemon=True)
    thread.start()
    try:
        yield running
    finally:
        running.stop("test over")
        thread.join(timeout=30)
        running.client.close()


def start_consumer(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """The Procfile's ``consumer:`` command in its own process, logging text to ``log``."""
    full_env = os.environ | {"WEBHOOK_LOG_FORMAT": "text"} | env | {"PATH": f"{BIN}:{os.environ['PATH']}"}
    with log.open("ab") as out:
        return subprocess.Popen(
            ["bash", "-c", f"exec {procfile('consumer')}"], cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT
        )


def forged_document(job_id: str, output_key: str = "out/denoised.wav") -> dict[str, Any]:
    """A TaskFinish callback for ``job_id`` as CI would send it (JSON form; see :func:`as_xml`)."""
    detail = {
        "JobId": job_id,
        "Tag": "NoiseReduction",
        "State": "Success",
        "Code": "Success",
        "Input": {"BucketId": BUCKET, "Object": "in/noisy.wav", "Region": REGION},
        "Operation": {"Output": {"Bucket": BUCKET, "Object": output_key, "Region": REGION}, "UserData": "u"},
    }
    return {"EventName": "TaskFinish", "JobsDetail": detail}


def as_json(document: dict[str, Any]) -> str:
    return json.dumps(document)


def as_xml(document: dict[str, Any]) -> str:
    text: str = xmltodict.unparse({"Response": document})
    return text


def submit_with_tdmq(sandbox: Sandbox, input_key: str, output_key: str, callback_format: str = "JSON") -> str:
    """A NoiseReduction job through the SDK whose callback CI puts on :data:`QUEUE`."""
    output = ObjectLocation(BUCKET, REGION, output_key)
    return submit_noise_reduction(sandbox.client(REGION), input_key, output, "", callback_format, callback_mq=MQ)


def counts(ledger: Ledger) -> dict[str, int]:
    """Rows of the tables recording writes to."""
    with ledger.engine.connect() as conn:
        return {
            table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in (callbacks, jobs, versions)
        }
