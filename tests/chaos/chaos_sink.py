"""The http sink's far end for the chaos run: refuses or trickles a seeded share of requests, records them all.

A threaded WSGI server (``BackgroundServer``). Every request body is read in chunks and parsed while it streams
(werkzeug's sans-io multipart decoder): the ``file`` part is base64-decoded on the fly and only
its size, CRC64 and SHA-256 are kept, and the Standard Webhooks signature is computed over the
same chunks, so memory stays flat however many deliveries arrive. Only then is the answer
drawn from a seeded RNG: trickled with probability ``trickle_rate``, 503 with probability
``failure_rate``, 200 otherwise.

A trickled answer is a ``200 OK`` status line followed by a header that never ends, one byte
every ``trickle_every`` seconds, until the sender hangs up (or ``trickle_limit`` seconds pass and
the sink hangs up itself). Its headers never complete, so the sender cannot tell it was a 200:
the request counts as not accepted, and the sender has to deliver again.

    with FlakySink(key, failure_rate=0.3, trickle_rate=0.1, seed=7) as sink:
        ...                               # point WEBHOOK_HTTP_SINK_URL at sink.url
        sink.attempts[0].file_sha256      # what the first request carried
        sink.attempts[0].accepted         # whether its sender saw a whole 200
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import random
import select
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any

from support.receiver import QuietHandler
from werkzeug.datastructures import Headers
from werkzeug.exceptions import ClientDisconnected
from werkzeug.http import HTTP_STATUS_CODES, parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData
from werkzeug.wsgi import get_input_stream

from webhook.ci.crc64 import crc64ecma
from webhook.web.server import BackgroundServer

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

_CHUNK = 64 * 1024
_GONE = 400  # answered to a request whose sender vanished mid-body; nobody reads it
# Sent at once when trickling, then the header's value one byte at a time: a line no client
# finishes reading at a byte a second, and none refuses as too long before 64 KiB.
_TRICKLE_HEAD = b"HTTP/1.1 200 OK\r\nX-Trickle: "


@dataclass(frozen=True)
class Attempt:
    """One request as received. ``status`` is what this receiver answered (or began to, if trickled)."""

    webhook_id: str
    status: int
    complete: bool  # the whole body arrived; False when the sender vanished mid-request
    signature_ok: bool
    event_id: str  # from the metadata part
    job_id: str  # metadata's job.job_id
    declared_size: int | None  # metadata's file.size
    declared_crc64: str | None  # metadata's file.crc64
    file_size: int  # of the decoded file part
    file_crc64: str
    file_sha256: str | None  # None when there was no file part
    problem: str  # why the request is malformed; "" if it is not
    # For a trickled answer: seconds from its first byte until the sender hung up; None otherwise.
    trickled_for: float | None = None
    outwaited: bool = False  # trickled until trickle_limit: the sender never gave up waiting

    @property
    def accepted(self) -> bool:
        """The sender saw a whole 200 to a whole request: the event is the receiver's now."""
        return self.complete and self.status == 200 and self.trickled_for is None

    @property
    def consistent(self) -> bool:
        """Signed correctly, well-formed, and the file is what its own metadata describes."""
        return (
            self.complete
            and self.signature_ok
            and not self.problem
            and self.file_sha256 is not None
            and self.declared_size == self.file_size
            and self.declared_crc64 == self.file_crc64
        )


class FlakySink:
    """Start with ``with``; :attr:`attempts` grows by one per request as it is answered (a trickle when it ends)."""

    def __init__(
        self,
        key: bytes,
        *,
        failure_rate: float,
        seed: int,
        trickle_rate: float = 0.0,
        trickle_every: float = 1.0,
        trickle_limit: float = 60.0,
    ) -> None:
        if failure_rate + trickle_rate > 1:
            raise ValueError("failure_rate and trickle_rate add up to more than 1")
        self.attempts: list[Attempt] = []
        self._key = key
        self._failure_rate = failure_rate
        self._trickle_rate = trickle_rate
        self._trickle_every = trickle_every
        self._trickle_limit = trickle_limit
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = BackgroundServer(self._app, name="flaky-sink", request_handler=QuietHandler)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>/``."""
        return self._server.url + "/"

    def __enter__(self) -> FlakySink:
        self._server.start()
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stopping.set()  # ends trickles in progress
        self._server.stop()

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        parsed = _Request(environ, self._key)
        with self._lock:
            # Drawn after the body is in, so the sender always gets (the start of) an answer to a whole request.
            draw = self._rng.random()
            trickle = parsed.complete and draw < self._trickle_rate
            fail = draw < self._trickle_rate + self._failure_rate
            status = _GONE if not parsed.complete else 503 if fail and not trickle else 200
            if not trickle:
                self.attempts.append(parsed.attempt(status))
        if trickle:
            seconds, outwaited = self._trickle(environ["werkzeug.socket"])
            with self._lock:
                self.attempts.append(parsed.attempt(status, trickled_for=seconds, outwaited=outwaited))
            # The connection is finished; werkzeug writes nothing more to a dropped one.
            raise ConnectionAbortedError("trickled answer ended")
        start_response(
            f"{status} {HTTP_STATUS_CODES[status]}", [("Content-Type", "text/plain"), ("Content-Length", "0")]
        )
        return [b""]

    def _trickle(self, sock: socket.socket) -> tuple[float, bool]:
        """Answer on ``sock`` a byte at a time until the sender hangs up; (seconds, whether it never did).

        Written to the socket directly: a WSGI server sends the status line and headers in one go.
        """
        started = time.monotonic()
        outwaited = False
        try:
            sock.sendall(_TRICKLE_HEAD)
            while True:
                # The whole request has been read, so anything readable now is the sender's FIN or RST.
                readable, _, _ = select.select([sock], [], [], self._trickle_every)
                if readable or self._stopping.is_set():
                    break
                if time.monotonic() - started >= self._trickle_limit:
                    outwaited = True
                    break
                sock.sendall(b".")
        except OSError:
            pass  # reset by the sender: it gave up
        finally:
            with contextlib.suppress(OSError):  # already gone
                sock.shutdown(socket.SHUT_RDWR)
        return time.monotonic() - started, outwaited


@dataclass
class _Base64File:
    """Decodes a base64 part that arrives in arbitrary slices; keeps only size, CRC64 and SHA-256."""

    size: int = 0
    crc64: int = 0
    sha256: Any = field(default_factory=hashlib.sha256)
    _pending: bytes = b""

    def feed(self, text: bytes) -> None:
        # RFC 2045 allows line breaks inside base64; only whole 4-character groups decode alone.
        text = self._pending + text.translate(None, b" \t\r\n")
        whole = len(text) - len(text) % 4
        self._pending = text[whole:]
        self._add(base64.b64decode(text[:whole], validate=True))

    def close(self) -> None:
        if self._pending:
            raise binascii.Error(f"{len(self._pending)} base64 characters left over at the end of the part")

    def _add(self, data: bytes) -> None:
        self.size += len(data)
        self.crc64 = crc64ecma(data, self.crc64)
        self.sha256.update(data)


class _Request:
    """Reads and parses one request body as it streams in."""

    def __init__(self, environ: WSGIEnvironment, key: bytes) -> None:
        self.headers = Headers([(k[5:].replace("_", "-"), v) for k, v in environ.items() if k.startswith("HTTP_")])
        self.webhook_id = self.headers.get("webhook-id", "")
        self.complete = False
        self.problem = ""
        self.metadata = bytearray()
        self.file: _Base64File | None = None
        self._mac = hmac.new(key, f"{self.webhook_id}.{self.headers.get('webhook-timestamp', '')}.".encode(), "sha256")
        _, options = parse_options_header(environ.get("CONTENT_TYPE", ""))
        self._decoder = MultipartDecoder(options.get("boundary", "").encode())
        self._part = ""  # name of the part being read
        try:
            self._read(environ)
        except ClientDisconnected:
            return  # a worker SIGKILLed mid-send: not a delivery, nobody waits for the answer
        except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
            self.problem = f"malformed body: {exc}"
        self.complete = True

    def _read(self, environ: WSGIEnvironment) -> None:
        expected = int(environ.get("CONTENT_LENGTH") or 0)
        received = 0
        for chunk in iter(partial(get_input_stream(environ).read, _CHUNK), b""):
            received += len(chunk)
            self._mac.update(chunk)
            self._decoder.receive_data(chunk)
            self._drain()
        if received != expected:
            raise ClientDisconnected()
        self._decoder.receive_data(None)
        self._drain()
        if self.file is not None:
            self.file.close()

    def _drain(self) -> None:
        while not isinstance(event := self._decoder.next_event(), NeedData):
            if isinstance(event, File | Field):
                self._part = event.name
                if isinstance(event, File) and event.name == "file":
                    if event.headers.get("Content-Transfer-Encoding", "").lower() != "base64":
                        raise ValueError("the file part is not Content-Transfer-Encoding: base64")
                    self.file = _Base64File()
            elif isinstance(event, Data):
                if self._part == "metadata":
                    self.metadata += event.data
                elif self._part == "file" and self.file is not None:
                    self.file.feed(event.data)
            elif isinstance(event, Epilogue):
                return  # the decoder refuses to be asked again once it has ended

    def attempt(self, status: int, trickled_for: float | None = None, outwaited: bool = False) -> Attempt:
        problem = self.problem
        meta: dict[str, Any] = {}
        if self.complete and not problem:
            try:
                meta = json.loads(self.metadata)
            except ValueError as exc:
                problem = f"metadata is not JSON: {exc}"
        declared = meta.get("file") or {}
        return Attempt(
            webhook_id=self.webhook_id,
            status=status,
            complete=self.complete,
            signature_ok=self.complete and self._signature_ok(),
            event_id=str(meta.get("event_id", "")),
            job_id=str((meta.get("job") or {}).get("job_id", "")),
            declared_size=declared.get("size"),
            declared_crc64=declared.get("crc64"),
            file_size=self.file.size if self.file else 0,
            file_crc64=str(self.file.crc64) if self.file else "",
            file_sha256=self.file.sha256.hexdigest() if self.file else None,
            problem=problem,
            trickled_for=trickled_for,
            outwaited=outwaited,
        )

    def _signature_ok(self) -> bool:
        expected = base64.b64encode(self._mac.digest()).decode()
        signatures = self.headers.get("webhook-signature", "").split()
        return any(hmac.compare_digest(s.partition(",")[2], expected) for s in signatures if s.startswith("v1,"))
