"""What the speed benchmarks (``ingest.py``, ``deliver.py``) share: processes, ledgers, percentiles, results.

Every process is started as a PaaS would start it (the Procfile's commands, configured only through
the environment) in its own session, so that stopping it also stops whatever it forked (gunicorn's
workers), and each logs to a file in the benchmark's temporary directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
BIN = Path(sys.executable).parent  # the venv's scripts: gunicorn, cos-webhook
COS_WEBHOOK = BIN / "cos-webhook"
GUNICORN = BIN / "gunicorn"
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
LEDGERS = ("sqlite", "postgresql")
STOP_TIMEOUT = 30.0


class BenchError(Exception):
    """The benchmark could not measure what it claims to measure."""


def clean_environ() -> dict[str, str]:
    """This process's environment without the caller's WEBHOOK_* and COS_* settings, with the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEBHOOK_", "COS_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    # Logs go to files, where "auto" would pick JSON; text is what a person reads after a failure.
    env["WEBHOOK_LOG_FORMAT"] = "text"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def procfile(process: str) -> str:
    """The command of the Procfile's ``process:`` line."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == process:
            return command.strip()
    raise BenchError(f"the Procfile has no {process}: line")


@dataclass
class Process:
    """A started command, its log, and a way to stop it and its children."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self, tail: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM the process group (gunicorn's master and workers, or a worker); SIGKILL after ``timeout``."""
        if self.popen.poll() is None:
            with suppress(ProcessLookupError):  # already gone
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):  # already gone
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        return self.popen.returncode


def start(name: str, command: Sequence[str], env: Mapping[str, str], log: Path, cwd: Path = ROOT) -> Process:
    with log.open("ab") as out:
        popen = subprocess.Popen(
            list(command), cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Process(name, popen, log)


@contextmanager
def running(
    name: str, command: Sequence[str], env: Mapping[str, str], log: Path, cwd: Path = ROOT
) -> Iterator[Process]:
    process = start(name, command, env, log, cwd)
    try:
        yield process
    finally:
        process.stop()


def shell_command(command: str, extra_args: Sequence[str] = ()) -> list[str]:
    """``command`` as the Procfile line is run (``bash -c 'exec …'``), with ``extra_args`` appended."""
    return ["bash", "-c", f"exec {command} {shlex.join(extra_args)}".rstrip()]


def wait_http_ok(url: str, process: Process, timeout: float = 60.0) -> None:
    """Until GET ``url`` answers 200; BenchError with the process's log if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise BenchError(f"{process.name} exited with {process.popen.returncode}:\n{process.log_text()}")
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass  # still starting
        time.sleep(0.05)
    raise BenchError(f"{process.name} did not answer {url} within {timeout:.0f} s:\n{process.log_text()}")


@contextmanager
def ledger_url(kind: str, work: Path, postgres_url: str = POSTGRES_URL) -> Iterator[str]:
    """A fresh, migrated ledger: a SQLite file in ``work``, or a private PostgreSQL schema dropped afterwards."""
    if kind == "sqlite":
        url = f"sqlite:///{work / 'ledger.db'}"
        migrate(url, work)
        yield url
        return
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_url)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        raise BenchError(f"PostgreSQL at {postgres_url} is not reachable (set TEST_POSTGRES_URL): {exc}") from None
    try:
        url = f"{postgres_url}?options=-csearch_path%3D{schema}"
        migrate(url, work)
        yield url
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def migrate(database_url: str, work: Path) -> None:
    """``cos-webhook migrate``: the Procfile's release phase."""
    env = clean_environ() | {"WEBHOOK_DATABASE_URL": database_url}
    done = subprocess.run(
        shell_command(procfile("release")), cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"cos-webhook migrate failed:\n{done.stdout}{done.stderr}")


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def write_results(name: str, document: dict[str, Any]) -> Path:
    """``bench/results/<name>.json`` (git-ignored), with when and where it was measured."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    header = {
        "benchmark": name,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_before": list(document.pop("load_average_before", os.getloadavg())),
    }
    path.write_text(json.dumps(header | document, indent=2) + "\n")
    return path


def positive(text: str) -> int:
    """An argparse type: a whole number above zero."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text}")
    return value
