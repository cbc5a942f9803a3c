"""Serve a WSGI app on a real socket from a background thread, inside a process that does something else.

The sandbox, the demo, a worker's own ``/metrics``, tests and benchmarks use it; the web
processes of a deployment are gunicorn's instead (:mod:`webhook.web.launch`).
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType
from typing import TYPE_CHECKING

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication


class BackgroundServer:
    """``with BackgroundServer(app) as server:`` serves ``app`` on ``server.url`` until the block ends.

    ``port=0`` picks a free port. ``server_class`` and ``request_handler`` customise werkzeug's
    threaded server (the sandbox resets connections; test receivers log nothing). It can be
    started again after :meth:`stop`, on a new port unless one was given.
    """

    def __init__(
        self,
        app: WSGIApplication,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        name: str = "wsgi-server",
        server_class: type[ThreadedWSGIServer] = ThreadedWSGIServer,
        request_handler: type[WSGIRequestHandler] | None = None,
    ) -> None:
        self.app = app
        self.host = host
        self._port = port
        self._name = name
        self._server_class = server_class
        self._request_handler = request_handler
        self._server: ThreadedWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> BackgroundServer:
        """Listen, then serve in a daemon thread; returns ``self``. A port that is taken raises OSError."""
        # Bound here rather than by werkzeug, which prints and exits the process when the port is
        # taken: a caller gets the OSError and decides (a worker's metrics port is retried).
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.create_server((self.host, self._port), family=family, backlog=128) as listening:
            # werkzeug serves a duplicate of the descriptor; this one closes on leaving the block.
            self._server = self._server_class(
                self.host, self._port, self.app, handler=self._request_handler, fd=listening.fileno()
            )
        # A short poll interval keeps stop() quick; tests start and stop many servers.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name=self._name, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (requests in flight finish on their own threads)."""
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
        self._server = self._thread = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"{self._name} is not running: call start() first")
        return self._server.port

    @property
    def url(self) -> str:
        """``http://<host>:<port>``, without a trailing slash."""
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
