"""The http sink's far end for the chaos run: refuses a seeded share of requests and records them all.

A threaded WSGI server (``BackgroundServer``). Every request body is read in chunks and parsed while it streams
(werkzeug's sans-io multipart decoder): the ``file`` part is base64-decoded on the fly and only
its size, CRC64 and SHA-256 are kept, and the Standard Webhooks signature is computed over the
same chunks, so memory stays flat however many deliveries arrive. Only then is the answer
drawn: 503 with probability ``failure_rate`` (a seeded RNG), 200 otherwise.

    with FlakySink(key, failure_rate=0.3, seed=7) as sink:
        ...                               # point WEBHOOK_HTTP_SINK_URL at sink.url
        sink.attempts[0].file_sha256      # what the first request carried
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import random
import threading
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

from webhook.crc64 import crc64ecma
from webhook.serving import BackgroundServer

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

_CHUNK = 64 * 1024
_GONE = 400  # answered to a request whose sender vanished mid-body; nobody reads it


@dataclass(frozen=True)
class Attempt:
    """One request as received. ``status`` is what this receiver answered."""

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
    """Start with ``with``; :attr:`attempts` grows by one per request, in arrival order."""

    def __init__(self, key: bytes, *, failure_rate: float, seed: int) -> None:
        self.attempts: list[Attempt] = []
        self._key = key
        self._failure_rate = failure_rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = BackgroundServer(self._app, name="flaky-sink", request_handler=QuietHandler)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>/``."""
        return self._server.url + "/"

    def __enter__(self) -> FlakySink:
        self._server.start()
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._server.stop()

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        parsed = _Request(environ, self._key)
        with self._lock:
            # Drawn after the body is in, so the sender always sees an answer to a whole request.
            fail = self._rng.random() < self._failure_rate
            status = _GONE if not parsed.complete else 503 if fail else 200
            self.attempts.append(parsed.attempt(status))
        start_response(
            f"{status} {HTTP_STATUS_CODES[status]}", [("Content-Type", "text/plain"), ("Content-Length", "0")]
        )
        return [b""]


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

    def attempt(self, status: int) -> Attempt:
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
        )

    def _signature_ok(self) -> bool:
        expected = base64.b64encode(self._mac.digest()).decode()
        signatures = self.headers.get("webhook-signature", "").split()
        return any(hmac.compare_digest(s.partition(",")[2], expected) for s in signatures if s.startswith("v1,"))
