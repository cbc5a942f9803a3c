"""The Procfile's web command under gunicorn, configured only by environment variables."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
from pipeline import TOKEN, Pipeline, settings_env

ROOT = Path(__file__).resolve().parent.parent
BIN = str(Path(sys.executable).parent)


def procfile(process: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name == process:
            return command.strip()
    raise AssertionError(f"no {process}: line in the Procfile")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def web(env: dict[str, str], log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    full_env = os.environ | env | {"PORT": str(port), "PATH": f"{BIN}:{os.environ['PATH']}"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {procfile('web')}"], cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gunicorn did not become healthy:\n{log.read_text()}")


def test_gunicorn_serves_callbacks_and_runs_the_worker_in_process(pipeline: Pipeline, tmp_path: Path) -> None:
    log = tmp_path / "web.log"
    env = settings_env(pipeline.settings) | {"WEBHOOK_RUN_WORKER": "true", "WEB_CONCURRENCY": "2"}
    with web(env, log) as (url, proc):
        wait_healthy(url, proc, log)
        job_id = pipeline.submit(pipeline.upload_input(), callback_url=f"{url}/callback/{TOKEN}")
        pipeline.wait_until(lambda: pipeline.status(job_id) == "delivered", timeout=30, what="in-process worker")
        metrics = requests.get(f"{url}/metrics", timeout=5).text
    assert 'cos_webhook_jobs{status="delivered"} 1' in metrics
    assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == pipeline.output_bytes()
    logged = log.read_text()
    assert "POST /callback/<token> 200" in logged
    assert TOKEN not in logged
    assert pipeline.settings.secret_key not in logged


def test_gunicorn_refuses_to_start_with_a_bad_setting(tmp_path: Path) -> None:
    log = tmp_path / "web.log"
    env = {"WEBHOOK_DATABASE_URL": f"sqlite:///{tmp_path / 'l.db'}", "WEBHOOK_CALLBACK_TOKEN": "short"}
    with web(env, log) as (_, proc):
        assert proc.wait(timeout=30) != 0
    assert "WEBHOOK_CALLBACK_TOKEN must be 16 to 256 characters" in log.read_text()
