"""moto's standalone S3 server in a subprocess on 127.0.0.1, for tests that talk S3 over HTTP.

    with MotoServer() as moto:
        boto3.client("s3", endpoint_url=moto.url, ...)
        moto.stop()    # connection refused from now on
        moto.start()   # the same port again, with an empty state

A subprocess rather than moto's ``ThreadedMotoServer`` so that stopping it really closes the port
(a "server is down" test sees connection refused) and its memory is not counted by tracemalloc.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from types import TracebackType

import requests


class MotoServer:
    """Start with :meth:`start` (or ``with``); every start serves the same port with fresh, empty state."""

    def __init__(self, startup_timeout: float = 30.0) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self._process is None, "the moto server is already running"
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self._startup_timeout
        while True:
            if self._process.poll() is not None:
                self._process = None
                raise RuntimeError(f"moto_server exited at start-up (is port {self.port} taken?)")
            try:
                # moto's own endpoint that answers once the app is loaded.
                requests.get(f"{self.url}/moto-api/data.json", timeout=1).raise_for_status()
                return
            except requests.RequestException:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"moto_server did not answer on {self.url} within {self._startup_timeout:g}s"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server and wait until the port refuses connections."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def _free_port() -> int:
    # The port is free now; moto binds it moments later (and again on every restart).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
