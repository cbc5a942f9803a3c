"""A real HTTP server on 127.0.0.1 for tests: records every request and answers as scripted.

    with Receiver(Reply(503, retry_after="7"), Reply(200)) as receiver:
        post_to(receiver.url)            # answered 503, then 200 from then on
        receiver.requests[0].headers["webhook-id"]

Bodies are read in chunks as they arrive; one larger than ``memory_limit`` is spooled to a file
(``body_path``) that :meth:`Receiver.stop` deletes, so big uploads stay out of memory. A stopped
receiver can be started again, on the same port: the far end of an http sink having an outage.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from werkzeug.datastructures import FileStorage
from werkzeug.formparser import parse_form_data
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.serving import WSGIRequestHandler
from werkzeug.wsgi import get_input_stream

from webhook.web.server import BackgroundServer

_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Reply:
    """One scripted answer. ``delay`` is waited after the body has been read, before answering;
    with ``hold``, the answer waits until that event is set."""

    status: int = 200
    delay: float = 0.0
    retry_after: str | None = None
    body: bytes = b""
    hold: threading.Event | None = None


@dataclass(frozen=True)
class ReceivedRequest:
    """A recorded request; ``headers`` has lower-cased names; exactly one of body/body_path is set."""

    method: str
    path: str
    headers: dict[str, str]
    size: int
    sha256: str
    body: bytes | None
    body_path: Path | None

    def form(self) -> tuple[dict[str, str], dict[str, FileStorage]]:
        """The multipart form fields and files, parsed the way a Flask receiver would."""
        with self.open_body() as body:
            environ = {
                "REQUEST_METHOD": "POST",
                "CONTENT_TYPE": self.headers["content-type"],
                "CONTENT_LENGTH": str(self.size),
                "wsgi.input": body,
            }
            _, form, files = parse_form_data(environ)
        return dict(form), dict(files)

    def open_body(self) -> IO[bytes]:
        """The body as a binary stream, whether it was kept in memory or spooled."""
        if self.body is not None:
            return io.BytesIO(self.body)
        assert self.body_path is not None
        return self.body_path.open("rb")


class Receiver:
    """Start with :meth:`start` (or ``with``); the replies play in order and the last one repeats."""

    def __init__(self, *replies: Reply, memory_limit: int = _CHUNK) -> None:
        self.requests: list[ReceivedRequest] = []
        self.memory_limit = memory_limit
        self._replies: list[Reply] = list(replies) or [Reply()]
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: BackgroundServer | None = None
        self._port = 0  # chosen by the first start, kept by the next ones
        self._spool: Path | None = None

    @property
    def url(self) -> str:
        """The receiver's base URL, ``http://127.0.0.1:<port>/``."""
        assert self._server is not None, "the receiver is not started"
        return self._server.url + "/"

    def reply(self, *replies: Reply) -> None:
        """Script the next answers (replacing any not yet used)."""
        with self._lock:
            self._replies = list(replies) or [Reply()]

    def start(self) -> Receiver:
        """Serve on a free port, or after :meth:`stop` again on the port it had."""
        self._stopping.clear()
        self._spool = Path(tempfile.mkdtemp(prefix="receiver-"))
        self._server = BackgroundServer(self._app, port=self._port, name="receiver", request_handler=QuietHandler)
        self._port = self._server.start().port
        return self

    def stop(self) -> None:
        """Stop serving (the port refuses connections), wake any delayed answer and delete spooled bodies."""
        self._stopping.set()
        if self._server is not None:
            self._server.stop()
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
        self._spool = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def _app(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self._record(environ)
        with self._lock:
            reply = self._replies.pop(0) if len(self._replies) > 1 else self._replies[0]
        if reply.delay:
            self._stopping.wait(reply.delay)
        while reply.hold is not None and not reply.hold.wait(0.05) and not self._stopping.is_set():
            pass
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(reply.body)))]
        if reply.retry_after is not None:
            headers.append(("Retry-After", reply.retry_after))
        start_response(f"{reply.status} {HTTP_STATUS_CODES.get(reply.status, 'Unknown')}", headers)
        return [reply.body]

    def _record(self, environ: dict[str, Any]) -> None:
        headers = {
            name.removeprefix("HTTP_").replace("_", "-").lower(): value
            for name, value in environ.items()
            if name.startswith("HTTP_") or (name in ("CONTENT_TYPE", "CONTENT_LENGTH") and value)
        }
        digest = hashlib.sha256()
        memory = bytearray()
        spooled: IO[bytes] | None = None
        size = 0
        with contextlib.ExitStack() as stack:
            for chunk in iter(partial(get_input_stream(environ).read, _CHUNK), b""):
                size += len(chunk)
                digest.update(chunk)
                if spooled is not None:
                    spooled.write(chunk)
                    continue
                memory += chunk
                if len(memory) > self.memory_limit:
                    spooled = stack.enter_context(tempfile.NamedTemporaryFile(dir=self._spool, delete=False))
                    spooled.write(memory)
                    memory.clear()
        recorded = ReceivedRequest(
            method=environ["REQUEST_METHOD"],
            path=environ.get("PATH_INFO", ""),
            headers=headers,
            size=size,
            sha256=digest.hexdigest(),
            body=None if spooled else bytes(memory),
            body_path=Path(spooled.name) if spooled else None,
        )
        with self._lock:
            self.requests.append(recorded)


class QuietHandler(WSGIRequestHandler):
    """Keeps the access log out of test output."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass
