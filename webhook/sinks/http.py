"""The http sink: POSTs each event, signed per Standard Webhooks, as JSON or as multipart/form-data.

``mode = "json"`` (:class:`HttpNotifySink`, the default) sends the event document alone, with
each file's ``location`` saying where to download it, as the notification sinks do.
``mode = "multipart"`` (:class:`HttpMultipartSink`) pushes the document and the audio files in one body.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version

import requests

from webhook.deadline import DEFAULT_MIN_RATE, Deadline, deadline_session, transfer_budget
from webhook.errors import ConfigError
from webhook.models import Event, FetchedFile
from webhook.sinks import BuildContext, DeliveryError, NotificationSink, Sink
from webhook.sinks.common import (
    os_reason,
    printable,
    retry_after_seconds,
    safe_content_type,
    shown_url,
    unreadable,
)
from webhook.sinks.events import event_document
from webhook.sinks.options import HttpOptions, NotifyOptions

_CHUNK = 3 * 64 * 1024  # a multiple of 3, so base64 chunks concatenate without padding
# The distribution's version, as `cos-webhook --version` reports it.
_USER_AGENT = f"cos-webhook/{version('cos-webhook')}"
_SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
# Worth another attempt besides 429 and 5xx: timeout, conflict (a concurrent attempt), too early.
_RETRYABLE_4XX = frozenset({408, 409, 425, 429})
_NO_HEAD = frozenset({405, 501})  # Method Not Allowed, Not Implemented: the receiver answers, HEAD is not done


class HttpPostSink(Sink):
    """The ``http`` sink type: one signed POST per event to ``url``, with its deadline and error handling.

    Built as the subclass its ``mode`` names (:meth:`from_options`), which decides the body.

    Each request carries ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature``
    (https://www.standardwebhooks.com) plus ``Idempotency-Key``, all derived from the event id,
    so a receiver can drop redeliveries. ``secret`` is either ``whsec_<base64>`` (the key is the
    decoded bytes, as Standard Webhooks libraries expect) or any other string (the key is its
    UTF-8 bytes).

    Each exchange (connecting, sending the body, reading the answer) has a deadline of
    ``timeout`` seconds plus the body's time at ``min_rate`` bytes/s; a receiver that is slower,
    even one trickling its answer a byte at a time, is cut off and the delivery retried.
    """

    def __init__(
        self, url: str, secret: str, timeout: float = 30.0, name: str = "http", min_rate: int = DEFAULT_MIN_RATE
    ) -> None:
        self.name = name
        self.url = url
        self.timeout = timeout
        self.min_rate = min_rate
        self._key = _signing_key(secret)
        # Only to scrub the secret from anything the remote echoes back into an error message.
        self._secret_text = secret.removeprefix(_SECRET_PREFIX)
        self._session = deadline_session()
        self._session.headers["User-Agent"] = _USER_AGENT

    @classmethod
    def from_options(cls, name: str, options: HttpOptions, context: BuildContext) -> HttpPostSink:
        """The sink of ``options.mode``: :class:`HttpNotifySink` for json, :class:`HttpMultipartSink` for multipart."""
        try:
            secret = context.secret(name, options.secret_env) or ""
            rate = context.min_transfer_rate
            if options.mode == "multipart":
                return HttpMultipartSink(options.url, secret, options.timeout, name=name, min_rate=rate)
            return HttpNotifySink(options.url, secret, options.timeout, name=name, min_rate=rate, options=options)
        except ValueError as exc:
            raise ConfigError(f"sink {name}: {options.secret_env}: {exc}") from None

    def target(self) -> str:
        return shown_url(self.url)

    def check(self) -> str:
        """HEAD the URL: any answer below 500 proves the receiver is reachable, not that it takes a POST.

        405 and 501 say the receiver does not do HEAD (so the POST stays unproven: the verdict says
        so); any other 5xx is a failure, like a refused or silent connection.
        """
        with Deadline(self.timeout, f"HEAD of sink {self.name}") as deadline:
            try:
                with self._session.head(self.url, timeout=self.timeout, allow_redirects=False) as response:
                    status = response.status_code
                    if status in _NO_HEAD:
                        return f"receiver is reachable but does not answer HEAD ({status}): POST was not proven"
                    if status >= 500:
                        raise self._refused(response)
                    return f"receiver answered HEAD with {status}"
            except requests.RequestException as exc:
                raise self._failed(exc, deadline) from exc

    def close(self) -> None:
        """Close pooled connections."""
        self._session.close()

    def _post(self, event_id: str, body: bytes | MultipartBody, content_type: str) -> None:
        """POST ``body`` once; raise :class:`DeliveryError` unless the receiver answers 2xx."""
        timestamp = str(int(time.time()))
        try:
            signature = _sign(self._key, event_id, timestamp, body)
        except OSError as exc:
            raise unreadable(self.name, exc) from exc
        headers = {
            "Content-Type": content_type,
            "webhook-id": event_id,
            "webhook-timestamp": timestamp,
            "webhook-signature": signature,
            "Idempotency-Key": event_id,
        }
        budget = transfer_budget(self.timeout, len(body), self.min_rate)
        with Deadline(budget, f"POST to sink {self.name}") as deadline:
            try:
                # A consumed stream cannot be resent, so redirects are reported, not followed.
                # The budget as per-read timeout too: a silent receiver ends in the deadline's error.
                with self._session.post(
                    self.url, data=body, headers=headers, timeout=budget, stream=True, allow_redirects=False
                ) as response:
                    if 200 <= response.status_code < 300:
                        return
                    raise self._refused(response)
            except requests.RequestException as exc:
                raise self._failed(exc, deadline) from exc

    def _failed(self, exc: requests.RequestException, deadline: Deadline) -> DeliveryError:
        if deadline.expired:
            return DeliveryError(f"{self.name}: {deadline.passed_message()}")
        if isinstance(exc, requests.Timeout):
            return DeliveryError(f"{self.name}: no answer within {self.timeout:g}s")
        # Not str(exc): it quotes the URL, whose query or userinfo may hold credentials.
        return DeliveryError(f"{self.name}: request failed: {os_reason(exc)}")

    def _refused(self, response: requests.Response) -> DeliveryError:
        status = response.status_code
        detail = printable(response.reason or "")
        try:
            snippet = printable(next(response.iter_content(200), b"").decode("utf-8", "replace"))
        except requests.RequestException:
            snippet = ""  # the status alone decides; a broken error body must not change that
        if snippet:
            detail = f"{detail}: {snippet}"
        if self._secret_text:
            detail = detail.replace(self._secret_text, "[redacted]")
        retryable = status in _RETRYABLE_4XX or status >= 500
        return DeliveryError(
            f"{self.name}: HTTP {status} {detail}".rstrip(),
            retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            permanent=not retryable,
            code=str(status),
        )


class HttpNotifySink(HttpPostSink, NotificationSink):
    """``mode = "json"``: POSTs the event document alone as ``application/json``.

    The worker never downloads the audio for it: each file's ``location`` (in ``file`` and
    ``files``) names the object CI wrote, or with ``file_from`` the copy a storage sink made, and
    with ``presign_seconds`` carries a presigned GET URL. The body is the document's UTF-8 JSON,
    what a stock Standard Webhooks library verifies and parses in one call.
    """

    def __init__(
        self,
        url: str,
        secret: str,
        timeout: float = 30.0,
        name: str = "http",
        min_rate: int = DEFAULT_MIN_RATE,
        options: NotifyOptions | None = None,
    ) -> None:
        super().__init__(url, secret, timeout, name, min_rate)
        self.options = options or NotifyOptions()

    def deliver(self, event: Event) -> None:
        """POST the document once; raise :class:`DeliveryError` unless the receiver answers 2xx."""
        self._post(event.event_id, json.dumps(event_document(event), ensure_ascii=False).encode(), "application/json")


class HttpMultipartSink(HttpPostSink):
    """``mode = "multipart"``: POSTs ``metadata`` (JSON) and, for a succeeded job, its audio files.

    The first of the document's ``files`` is the part ``file``, as when jobs had one; its ``n``-th,
    from the second on, the part ``file.<n>`` (``file.2``, ``file.3``…). The body is streamed from
    disk twice, once to sign it and once to send it, and is never held in memory.
    """

    def deliver(self, event: Event) -> None:
        """POST the event once; raise :class:`DeliveryError` unless the receiver answers 2xx."""
        if any(file.fetched.path is None for file in event.files):
            raise DeliveryError(f"{self.name}: job {event.job.job_id}: the output was not downloaded", permanent=True)
        metadata = event_document(event)
        parts = [
            FilePart(part_name(n), entry["name"], file.fetched)
            for n, (entry, file) in enumerate(zip(metadata["files"], event.files, strict=True), start=1)
        ]
        try:
            body = MultipartBody(json.dumps(metadata, ensure_ascii=False).encode(), parts)
        except OSError as exc:
            raise unreadable(self.name, exc) from exc
        self._post(event.event_id, body, body.content_type)


def part_name(number: int) -> str:
    """The multipart part that carries file ``number`` (from 1) of an event: ``file``, ``file.2``, ``file.3``…"""
    return "file" if number == 1 else f"file.{number}"


@dataclass(frozen=True)
class FilePart:
    """One file of a multipart body: its part's name, the file name it is sent as, and the file on disk."""

    name: str
    filename: str
    file: FetchedFile


class MultipartBody:
    """A multipart/form-data body with a ``metadata`` part and a part per file, read from disk.

    File parts are base64 (``Content-Transfer-Encoding: base64``) so that the whole body is
    UTF-8 text: Standard Webhooks libraries verify the signature over the body as a string and
    cannot take raw audio bytes. Iterable any number of times (each pass reopens the files);
    ``len()`` is the exact byte count, which makes ``requests`` send a Content-Length instead of
    chunked encoding.
    """

    def __init__(self, metadata: bytes, parts: Sequence[FilePart] = ()) -> None:
        self.boundary = "cos-webhook-" + os.urandom(16).hex()
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        delimiter = f"--{self.boundary}\r\n".encode()
        self._head = delimiter + _part_headers('name="metadata"', "application/json") + metadata + b"\r\n"
        self._files: list[tuple[bytes, str, int]] = []  # each part's headers, its file and that file's size
        for part in parts:
            assert part.file.path is not None  # a success arrives downloaded (needs_bytes)
            disposition = f'name="{part.name}"; filename="{_quote_filename(part.filename)}"'
            headers = _part_headers(disposition, safe_content_type(part.file.content_type), base64_encoded=True)
            self._files.append((delimiter + headers, part.file.path, os.stat(part.file.path).st_size))
        self._tail = f"--{self.boundary}--\r\n".encode()

    def __len__(self) -> int:
        files = sum(len(headers) + 4 * -(-size // 3) + 2 for headers, _, size in self._files)
        return len(self._head) + files + len(self._tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self._head
        for headers, path, size in self._files:
            yield headers
            with open(path, "rb") as source:
                remaining = size
                while remaining:
                    chunk = source.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise OSError(f"{path} shrank while it was being sent")
                    remaining -= len(chunk)
                    yield base64.b64encode(chunk)
            yield b"\r\n"
        yield self._tail


def _signing_key(secret: str) -> bytes:
    if secret.startswith(_SECRET_PREFIX):
        encoded = secret[len(_SECRET_PREFIX) :]
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except binascii.Error:
            raise ValueError(f"the HTTP sink secret starts with {_SECRET_PREFIX} but is not valid base64") from None
    else:
        key = secret.encode()
    if not key:
        raise ValueError("the HTTP sink secret is empty")
    return key


def _sign(key: bytes, msg_id: str, timestamp: str, body: bytes | MultipartBody) -> str:
    """``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, hashing the body as it streams past."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode(), hashlib.sha256)
    for chunk in (body,) if isinstance(body, bytes) else body:
        mac.update(chunk)
    return "v1," + base64.b64encode(mac.digest()).decode()


def _part_headers(disposition: str, content_type: str, base64_encoded: bool = False) -> bytes:
    encoding = "Content-Transfer-Encoding: base64\r\n" if base64_encoded else ""
    return f"Content-Disposition: form-data; {disposition}\r\nContent-Type: {content_type}\r\n{encoding}\r\n".encode()


def _quote_filename(name: str) -> str:
    # The escaping browsers use (WHATWG HTML): a quote or line break in the name cannot end the header.
    return name.replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22")
