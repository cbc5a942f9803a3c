"""The service's own processes, started as a PaaS would: the Procfile's web command and workers."""

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

ROOT = Path(__file__).resolve().parents[2]  # the repository: tests/support/processes.py
BIN = str(Path(sys.executable).parent)
COS_WEBHOOK = str(Path(BIN) / "cos-webhook")
# Logs go to a file, so WEBHOOK_LOG_FORMAT=auto would pick JSON: tests read text unless they ask.
TEXT_LOGS = {"WEBHOOK_LOG_FORMAT": "text"}


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
def web(env: dict[str, str], log: Path, port: int | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The Procfile's ``web:`` command (gunicorn) on ``port``, logging to ``log``."""
    port = port or free_port()
    full_env = os.environ | TEXT_LOGS | env | {"PORT": str(port), "PATH": f"{BIN}:{os.environ['PATH']}"}
    with log.open("ab") as out:
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
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass  # still booting
        time.sleep(0.1)
    raise AssertionError(f"gunicorn did not become healthy:\n{log.read_text()}")


def start_worker(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``cos-webhook worker`` in its own process, logging to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [COS_WEBHOOK, "worker", *args], env=os.environ | TEXT_LOGS | env, stdout=out, stderr=subprocess.STDOUT
        )
