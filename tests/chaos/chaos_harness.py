"""The moving parts of the chaos run: processes that get killed and restarted, CI's retries, a CI outage."""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from support.processes import free_port, start_worker, wait_healthy, web

from webhook.dev.sandbox import Sandbox, SentCallback
from webhook.dev.sandbox.faults import Fault
from webhook.ledger import utcnow


class Background(threading.Thread):
    """A daemon thread that keeps the exception it died of, for the main thread to re-raise."""

    def __init__(self, name: str, target: Callable[[], object]) -> None:
        super().__init__(name=name, daemon=True)
        self._run_target = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run_target()
        except BaseException as exc:
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"background thread {self.name} failed: {self.error!r}") from self.error


class WebServer:
    """The Procfile's ``web:`` process (gunicorn) on a fixed port, so it can be restarted in place."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.restarts = 0
        self._env = env
        self._log = log
        self._stack: contextlib.ExitStack | None = None

    def start(self) -> None:
        self._stack = contextlib.ExitStack()
        # Kept before waiting, so stop() terminates a server that never became healthy too.
        _, proc = self._stack.enter_context(web(self._env, self._log, self.port))
        wait_healthy(self.url, proc, self._log)

    def stop(self) -> None:
        """SIGTERM: gunicorn finishes the requests in flight, then exits."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def restart(self, down_seconds: float) -> None:
        # Staying down longer than the sandbox's own retries (about 1.7 s) makes some callbacks
        # fail for good, as a slow deploy does with CI: the run must recover those too.
        self.stop()
        time.sleep(down_seconds)
        self.start()
        self.restarts += 1


class WorkerFleet:
    """``size`` ``cos-webhook worker`` processes; one SIGKILLed is replaced at once.

    A killed worker cannot release its leases. Its successor, on the same host, finds the
    killed pid gone when it registers and releases them then (so does the other worker at its
    next heartbeat); whatever is left comes back when its lease runs out.
    """

    def __init__(self, env: dict[str, str], log_dir: Path, size: int) -> None:
        self.kills = 0
        self.unexpected_exits: list[str] = []  # a worker that died without being killed
        self._env = env
        self._logs = [log_dir / f"worker-{slot}.log" for slot in range(size)]
        self._procs: list[subprocess.Popen[bytes]] = []
        # Where each slot's log ended when its current process started: it is ready once it has
        # logged "started" after that point (one killed while booting never logs it).
        self._log_offsets = [0] * size
        self._lock = threading.Lock()

    @property
    def logs(self) -> list[Path]:
        return list(self._logs)

    def start(self) -> None:
        with self._lock:
            self._procs = [self._start(slot) for slot in range(len(self._logs))]

    def _start(self, slot: int) -> subprocess.Popen[bytes]:
        log = self._logs[slot]
        self._log_offsets[slot] = log.stat().st_size if log.exists() else 0
        return start_worker(self._env, log)

    def _ready(self, slot: int) -> bool:
        """The slot's current worker has installed its SIGTERM handler (it logs "started" right after)."""
        with self._logs[slot].open("rb") as log:
            log.seek(self._log_offsets[slot])
            return b" started sinks=" in log.read()

    def _booting(self) -> bool:
        return any(proc.poll() is None and not self._ready(slot) for slot, proc in enumerate(self._procs))

    def kill_one(self, rng: random.Random) -> None:
        """SIGKILL a worker chosen by ``rng`` (no chance to release its leases), then start its successor."""
        with self._lock:
            slot = rng.randrange(len(self._procs))
            proc = self._procs[slot]
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                self.kills += 1
            else:
                self.unexpected_exits.append(f"worker slot {slot} had exited with {proc.returncode}")
            self._procs[slot] = self._start(slot)

    def stop(self, timeout: float = 30) -> list[int]:
        """SIGTERM every worker (each finishes its claim first); returns their exit codes.

        A worker the killer has just replaced may still be importing; SIGTERM would end it with
        Python's default action (-15) and say nothing about the graceful stop, so wait until each
        one is ready first.
        """
        with self._lock:
            ready_by = time.monotonic() + timeout
            while self._booting() and time.monotonic() < ready_by:
                time.sleep(0.1)
            for proc in self._procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            codes = []
            for proc in self._procs:
                try:
                    codes.append(proc.wait(timeout=timeout))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    codes.append(proc.wait())
            self._procs = []
            return codes


def kill_workers_now_and_then(
    fleet: WorkerFleet, rng: random.Random, stop: threading.Event, every: tuple[float, float], max_kills: int
) -> None:
    """Kill a random worker every ``every`` seconds (drawn uniformly) until ``stop`` or ``max_kills``."""
    for _ in range(max_kills):
        if stop.wait(rng.uniform(*every)):
            return
        fleet.kill_one(rng)


@dataclass
class CallbackPump:
    """CI's side beyond the sandbox: callbacks are retried until accepted, and some arrive twice.

    Every callback the sandbox sent is looked at once, in order. One that the sandbox could
    not deliver after its own retries (no answer, or not 2xx) is POSTed again until it is
    accepted. A delivered one is POSTed again with probability ``duplicate_share``, as CI does
    when it did not see an answer in time; its answer must say ``duplicate``.
    """

    sandbox: Sandbox
    callback_url: str
    total: int
    duplicate_share: float
    rng: random.Random
    deadline: float  # time.monotonic() after which nothing is retried any more
    handled: int = 0
    delivered_by_sandbox: int = 0
    sandbox_attempts: int = 0
    reposted: int = 0
    repost_attempts: int = 0
    reposts_found_stored: int = 0  # the sandbox's attempt had been stored, only its answer was lost
    duplicates_sent: int = 0
    duplicates_recognised: int = 0  # answered {"duplicate": true}
    failures: list[str] = field(default_factory=list)  # answers that are wrong, not just unavailable

    @property
    def finished(self) -> bool:
        return self.handled >= self.total

    def run(self, stop: threading.Event) -> None:
        while not self.finished and not stop.is_set():
            sent = self.sandbox.callbacks_sent
            for callback in sent[self.handled :]:
                self._handle(callback)
                self.handled += 1
            if len(sent) == self.handled:
                stop.wait(0.05)

    def _handle(self, callback: SentCallback) -> None:
        self.sandbox_attempts += callback.attempts
        if callback.status_code is not None and 200 <= callback.status_code < 300:
            self.delivered_by_sandbox += 1
            if self.rng.random() < self.duplicate_share:
                answer = self._post_until_accepted(callback)
                self.duplicates_sent += 1
                if answer is not None and answer.get("duplicate") is True:
                    self.duplicates_recognised += 1
                elif answer is not None:
                    self.failures.append(f"duplicate of {callback.job_id} was not recognised: {answer}")
            return
        self.reposted += 1
        answer = self._post_until_accepted(callback, repost=True)
        if answer is not None and answer.get("duplicate") is True:
            self.reposts_found_stored += 1

    def _post_until_accepted(self, callback: SentCallback, repost: bool = False) -> dict[str, Any] | None:
        content_type = "application/json" if callback.format == "json" else "application/xml"
        while time.monotonic() < self.deadline:
            if repost:
                self.repost_attempts += 1
            try:
                response = requests.post(
                    self.callback_url, data=callback.body, headers={"Content-Type": content_type}, timeout=10
                )
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(0.25)  # the web server is restarting
                continue
            if response.status_code == 200:
                answer: dict[str, Any] = response.json()
                return answer
            if response.status_code < 500:
                self.failures.append(f"callback of {callback.job_id} refused: {response.status_code} {response.text}")
                return None
            time.sleep(0.25)
        self.failures.append(f"callback of {callback.job_id} still not accepted at the deadline")
        return None


@dataclass
class CiOutage:
    """CI's DescribeMediaJob answering 503 for ``seconds``, from when ``after`` callbacks have been sent.

    Times are kept as the ledger records attempts (naive UTC), so verifications can be matched
    against the outage.
    """

    sandbox: Sandbox
    after: int
    seconds: float
    started_at: datetime | None = None
    ended_at: datetime | None = None
    lasted: float = 0.0  # seconds, shorter than ``seconds`` only if the run was stopped meanwhile
    refused: int = 0  # DescribeMediaJob requests answered 503 (the SDK retries each once)

    def run(self, stop: threading.Event) -> None:
        while len(self.sandbox.callbacks_sent) < self.after:
            if stop.wait(0.1):
                return
        outage = self.sandbox.faults.add(Fault(kind="CI describe", status=503))
        self.started_at, began = utcnow(), time.monotonic()
        try:
            stop.wait(self.seconds)
        finally:
            self.sandbox.faults.clear()  # the run injects no other sandbox fault
            self.ended_at, self.lasted = utcnow(), time.monotonic() - began
            self.refused = outage.fired
