"""The http sink: POSTs each event, signed per Standard Webhooks, as JSON or as multipart/form-data.

``mode = "json"`` (:class:`HttpNotifySink`, the default) sends the event document alone, with
``file.location`` saying where to download the audio, as the notification sinks do.
``mode = "multipart"`` (:class:`HttpMultipartSink`) pushes the document and the audio in one body.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import time
from collections.abc import Iterator
from importlib.metadata import version

import requests

from webhook.deadline import DEFAULT_MIN_RATE, Deadline, deadline_session, transfer_budget
from webhook.errors import ConfigError
from webhook.models import Event, FetchedFile
from webhook.sinks import BuildContext, DeliveryError, NotificationSink, Sink
from webhook.sinks.common import os_reason, printable, retry_after_seconds, safe_content_type, unreadable
from webhook.sinks.events import event_document
from webhook.sinks.options import HttpOptions, NotifyOptions

_CHUNK = 3 * 64 * 1024  # a multiple of 3, so base64 chunks concatenate without padding
# The distribution's version, as `cos-webhook --version` reports it.
_USER_AGENT = f"cos-webhook/{version('cos-webhook')}"
_SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
# Worth another attempt besides 429 and 5xx: timeout, conflict (a concurrent attempt), too early.
_RETRYABLE_4XX = frozenset({408, 409, 425, 429})


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

    def check(self) -> str:
        """Any HTTP answer proves the receiver is reachable; a refused or silent one does not."""
        with Deadline(self.timeout, f"HEAD of sink {self.name}") as deadline:
            try:
                with self._session.head(self.url, timeout=self.timeout, allow_redirects=False) as response:
                    return f"receiver answered HEAD with {response.status_code}"
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

    The worker never downloads the audio for it: ``file.location`` names CI's output object, or
    with ``file_from`` the copy a storage sink made, and with ``presign_seconds`` carries a
    presigned GET URL. The body is the document's UTF-8 JSON, what a stock Standard Webhooks
    library verifies and parses in one call.
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
    """``mode = "multipart"``: POSTs ``metadata`` (JSON) and, for a succeeded job, ``file`` (the audio).

    The body is streamed from disk twice, once to sign it and once to send it, and is never
    held in memory.
    """

    def deliver(self, event: Event) -> None:
        """POST the event once; raise :class:`DeliveryError` unless the receiver answers 2xx."""
        metadata = event_document(event)
        try:
            filename = metadata["file"]["name"] if metadata["file"] else ""
            body = MultipartBody(json.dumps(metadata, ensure_ascii=False).encode(), event.file, filename)
        except OSError as exc:
            raise unreadable(self.name, exc) from exc
        self._post(event.event_id, body, body.content_type)


class MultipartBody:
    """A multipart/form-data body with a ``metadata`` part and an optional ``file`` part read from disk.

    The file part is base64 (``Content-Transfer-Encoding: base64``) so that the whole body is
    UTF-8 text: Standard Webhooks libraries verify the signature over the body as a string and
    cannot take raw audio bytes. Iterable any number of times (each pass reopens the file);
    ``len()`` is the exact byte count, which makes ``requests`` send a Content-Length instead of
    chunked encoding.
    """

    def __init__(self, metadata: bytes, file: FetchedFile | None, filename: str) -> None:
        self.boundary = "cos-webhook-" + os.urandom(16).hex()
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        delimiter = f"--{self.boundary}\r\n".encode()
        head = delimiter + _part_headers('name="metadata"', "application/json") + metadata + b"\r\n"
        # A failure event has no file; a success always arrives downloaded (needs_bytes).
        self._path = file.path if file else None
        self._size = os.stat(self._path).st_size if self._path else 0
        if file:
            disposition = f'name="file"; filename="{_quote_filename(filename)}"'
            head += delimiter + _part_headers(disposition, safe_content_type(file.content_type), base64_encoded=True)
            self._tail = f"\r\n--{self.boundary}--\r\n".encode()
        else:
            self._tail = f"--{self.boundary}--\r\n".encode()
        self._head = head

    def __len__(self) -> int:
        return len(self._head) + 4 * -(-self._size // 3) + len(self._tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self._head
        if self._path is not None:
            with open(self._path, "rb") as source:
                remaining = self._size
                while remaining:
                    chunk = source.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise OSError(f"{self._path} shrank while it was being sent")
                    remaining -= len(chunk)
                    yield base64.b64encode(chunk)
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
