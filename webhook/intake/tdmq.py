"""A small client of TDMQ for CMQ's data-plane HTTP API (``POST /v2/index.php``), and its signature.

The official Python SDKs for this API are Python 2 era and not thread-safe; this client is a few
actions on ``requests``, each bounded by a :class:`~webhook.deadline.Deadline`.

Confirmed in Tencent's CMQ / TDMQ-CMQ documents (cloud.tencent.com 406/5906, 406/5924, 406/5841,
1496/122722, 1496/127325, tencentcloud.com 1111/46418, 1111/46420, 1110/44169, 1111/43005) and in
the ``tencentyun/cmq-python-sdk`` source:

- endpoints ``https://cmq-{region}.public.tencenttdmq.com`` (the SDK's sample; the English pages
  show ``cmq-gz.publicXXX.tencenttdmq.com`` and say to copy the address from the console, hence
  ``WEBHOOK_TDMQ_ENDPOINT``) and ``http://{region}.mqadapter.cmq.tencentyun.com`` in the VPC;
- every action is a form-encoded POST of ``Action``, ``SecretId``, ``Nonce``, ``Timestamp``,
  ``SignatureMethod`` (``HmacSHA1`` or ``HmacSHA256``), ``Signature`` and its own parameters;
- the string to sign is ``POST`` + host + ``/v2/index.php`` + ``?`` + every other parameter as
  ``key=value`` (raw values, ``_`` in keys written ``.``) sorted by key and joined by ``&``; the
  signature is the base64 HMAC of it with the secret key. The document's own example reproduces
  (``tests/test_tdmq.py``);
- answers are JSON with ``code`` (0 on success), ``message`` and ``requestId``; BatchReceiveMessage
  takes ``numOfMsg`` 1 to 16 and ``pollingWaitSeconds`` 0 to 30 and answers ``msgInfoList`` (``msgBody``,
  ``msgId``, ``receiptHandle``, ``enqueueTime``, ``nextVisibleTime``, ``firstDequeueTime``,
  ``dequeueCount``); BatchDeleteMessage takes ``receiptHandle.n`` (consecutive, from 0 or 1) and
  answers 6010 (some failed) or 6020 (all failed) with ``errorList`` (``code``, ``message``,
  ``receiptHandle``); 4100 authentication, 4420 rate limit, 4430 a handle that is stale or not
  valid, 4440 no such queue, 6000 an internal error and 7000 no message (the SDK's list);
- a received message stays invisible for the queue's ``VisibilityTimeout`` (1 to 43200 s, default
  30), after which it comes back with a new handle; only the latest handle deletes it.

Not confirmed: whether an error ever comes with an HTTP status other than 200 (the SDK treats any
other status as a network fault, and so does this client: retried unless it is a client error);
the meaning of ``firstDequeueTime`` and ``dequeueCount``, documented as reserved fields (kept,
never relied on); how far ``Timestamp`` may be from the server's clock; ``Token`` for temporary
credentials (sent when given, as the common parameters list it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests

from webhook.config import Settings
from webhook.deadline import Deadline, deadline_session
from webhook.errors import ConfigError

PATH = "/v2/index.php"
MAX_BATCH = 16
MAX_WAIT = 30

OK = 0
AUTH_FAILED = 4100
RATE_LIMITED = 4420
STALE_HANDLE = 4430
NO_QUEUE = 4440
INTERNAL = 6000
SOME_NOT_DELETED = 6010
NONE_DELETED = 6020
NO_MESSAGE = 7000
NETWORK = -1  # no answer, or not a CMQ answer

# Codes that no retry can change: the credentials, the CAM policy or the queue's name are wrong.
FATAL = frozenset({AUTH_FAILED, NO_QUEUE, 4000})
_REGION = re.compile(r"[a-z]{2,8}")  # CMQ's own names: gz, sh, bj, cd, hk, shjr, usw …
_HASHES = {"HmacSHA1": hashlib.sha1, "HmacSHA256": hashlib.sha256}
_DEFAULT_PORTS = {"http": 80, "https": 443}


def public_endpoint(region: str) -> str:
    return f"https://cmq-{region}.public.tencenttdmq.com"


def string_to_sign(method: str, host: str, path: str, params: Mapping[str, str]) -> str:
    """What is signed: method, host and path, then every parameter but ``Signature``, sorted by key."""
    pairs = "&".join(f"{key.replace('_', '.')}={params[key]}" for key in sorted(params) if key != "Signature")
    return f"{method.upper()}{host}{path}?{pairs}"


def sign(secret_key: str, text: str, method: str = "HmacSHA256") -> str:
    """The base64 HMAC of ``text``; ``method`` is ``HmacSHA1`` or ``HmacSHA256``."""
    try:
        digest = _HASHES[method]
    except KeyError:
        raise ValueError(f"SignatureMethod must be HmacSHA1 or HmacSHA256, not {method!r}") from None
    return base64.b64encode(hmac.new(secret_key.encode(), text.encode(), digest).digest()).decode()


def host_of(endpoint: str) -> str:
    """The host as an HTTP client names it in ``Host`` (and so as it is signed): the port only if not the default."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    if parts.port is not None and parts.port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


@dataclass(frozen=True)
class Message:
    """One message as BatchReceiveMessage hands it over; ``receipt_handle`` deletes it until it is visible again."""

    msg_id: str
    body: str
    receipt_handle: str
    enqueue_time: int
    next_visible_time: int
    first_dequeue_time: int = 0
    dequeue_count: int = 0


@dataclass(frozen=True)
class DeleteFailure:
    receipt_handle: str
    code: int
    message: str


class CmqError(Exception):
    """An action that failed: CMQ's ``code`` (or :data:`NETWORK`), its message, and the HTTP status if one came."""

    def __init__(
        self,
        action: str,
        code: int,
        message: str,
        status: int | None = None,
        request_id: str = "",
        failures: tuple[DeleteFailure, ...] = (),
    ) -> None:
        super().__init__(f"{action}: {message} (code {code}{f', request {request_id}' if request_id else ''})")
        self.action = action
        self.code = code
        self.message = message
        self.status = status
        self.request_id = request_id
        self.failures = failures  # BatchDeleteMessage's errorList

    @property
    def fatal(self) -> bool:
        """Whether retrying cannot help: bad credentials or policy, no such queue, a refused request."""
        if self.code in FATAL:
            return True
        # A gateway's own 4xx (a wrong endpoint path, a forbidden host) will answer the same again.
        return self.status is not None and 400 <= self.status < 500 and self.status not in (408, 429)


@dataclass(frozen=True)
class Credentials:
    endpoint: str
    secret_id: str
    secret_key: str


def credentials(settings: Settings) -> Credentials:
    """Where and as whom to reach TDMQ: ``WEBHOOK_TDMQ_ENDPOINT`` or the region's public endpoint, and the
    TDMQ keys, else the COS ones. Raise :class:`ConfigError` naming what is missing."""
    if not settings.tdmq_queues:
        raise ConfigError("WEBHOOK_TDMQ_QUEUE is not set (the CMQ queue CI sends callbacks to)")
    endpoint = settings.tdmq_endpoint
    if not endpoint:
        if not settings.tdmq_region:
            raise ConfigError("WEBHOOK_TDMQ_REGION is not set (sh, bj, gz, cd, hk …), nor WEBHOOK_TDMQ_ENDPOINT")
        if not _REGION.fullmatch(settings.tdmq_region):
            raise ConfigError(
                f"WEBHOOK_TDMQ_REGION must be TDMQ's short region name (sh, bj, gz, cd, hk …), "
                f"not {settings.tdmq_region!r}"
            )
        endpoint = public_endpoint(settings.tdmq_region)
    secret_id = settings.tdmq_secret_id or settings.secret_id
    secret_key = settings.tdmq_secret_key or settings.secret_key
    if not secret_id or not secret_key:
        raise ConfigError("TDMQ_SECRET_ID and TDMQ_SECRET_KEY are not set, nor COS_SECRET_ID and COS_SECRET_KEY")
    return Credentials(endpoint.rstrip("/"), secret_id, secret_key)


class CmqClient:
    """The queue actions cos-webhook uses. Thread-safe: each call is one request on a shared session."""

    def __init__(
        self,
        endpoint: str,
        secret_id: str,
        secret_key: str,
        *,
        signature_method: str = "HmacSHA256",
        token: str = "",
        timeout: float = 10.0,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.host = host_of(self.endpoint)
        self._secret_id = secret_id
        self._secret_key = secret_key
        self._method = signature_method
        self._token = token
        self.timeout = timeout
        self._session = deadline_session()

    @classmethod
    def from_settings(cls, settings: Settings) -> CmqClient:
        found = credentials(settings)
        return cls(found.endpoint, found.secret_id, found.secret_key)

    def close(self) -> None:
        self._session.close()

    def receive(self, queue: str, count: int = MAX_BATCH, wait: int = MAX_WAIT) -> list[Message]:
        """Up to ``count`` messages, waiting up to ``wait`` s for the first (long polling); [] if none came."""
        params = {"queueName": queue, "numOfMsg": str(count), "pollingWaitSeconds": str(wait)}
        try:
            answer = self.call("BatchReceiveMessage", params, wait=wait)
        except CmqError as exc:
            if exc.code == NO_MESSAGE:
                return []
            raise
        return parse_messages(answer)

    def delete(self, queue: str, handles: Sequence[str]) -> list[DeleteFailure]:
        """Delete by receipt handle; the handles that could not be (stale, or already deleted), with why."""
        if not handles:
            return []
        params = {"queueName": queue} | {f"receiptHandle.{n}": handle for n, handle in enumerate(handles, 1)}
        try:
            self.call("BatchDeleteMessage", params)
        except CmqError as exc:
            if exc.code in (SOME_NOT_DELETED, NONE_DELETED):
                return list(exc.failures)
            raise
        return []

    def send(self, queue: str, body: str, delay: int = 0) -> str:
        """Put a message on ``queue``; its msgId."""
        answer = self.call("SendMessage", {"queueName": queue, "msgBody": body, "delaySeconds": str(delay)})
        return str(answer.get("msgId", ""))

    def call(self, action: str, params: Mapping[str, str], wait: float = 0.0) -> dict[str, Any]:
        """One signed action; its JSON answer when ``code`` is 0, else :class:`CmqError`."""
        form = self.signed(action, params, nonce=secrets.randbelow(2**62) + 1, timestamp=int(time.time()))
        with Deadline(self.timeout + wait, f"CMQ {action}") as deadline:
            try:
                response = self._session.post(self.endpoint + PATH, data=form, timeout=self.timeout + wait)
                text = response.text
            except requests.RequestException as exc:
                why = deadline.passed_message() if deadline.expired else type(exc).__name__
                raise CmqError(action, NETWORK, f"no answer from {self.host}: {why}") from None
        return _answer(action, response.status_code, text)

    def signed(self, action: str, params: Mapping[str, str], *, nonce: int, timestamp: int) -> dict[str, str]:
        """``params`` with the common parameters and their ``Signature``."""
        form = {
            **params,
            "Action": action,
            "SecretId": self._secret_id,
            "Nonce": str(nonce),
            "Timestamp": str(timestamp),
            "SignatureMethod": self._method,
        }
        if self._token:
            form["Token"] = self._token
        form["Signature"] = sign(self._secret_key, string_to_sign("POST", self.host, PATH, form), self._method)
        return form


def _answer(action: str, status: int, text: str) -> dict[str, Any]:
    """Pure: the JSON answer of a 200, or the :class:`CmqError` it stands for."""
    if status != 200:
        raise CmqError(action, NETWORK, f"HTTP {status}: {text[:200]!r}", status=status)
    try:
        answer = json.loads(text)
    except ValueError:
        raise CmqError(action, NETWORK, f"the answer is not JSON: {text[:200]!r}", status=status) from None
    if not isinstance(answer, dict) or not isinstance(answer.get("code"), int):
        raise CmqError(action, NETWORK, f"the answer has no code: {text[:200]!r}", status=status)
    code: int = answer["code"]
    if code != OK:
        message, request_id = str(answer.get("message", "")), str(answer.get("requestId", ""))
        raise CmqError(action, code, message, status, request_id, _failures(answer.get("errorList")))
    return answer


def _failures(items: Any) -> tuple[DeleteFailure, ...]:
    if not isinstance(items, list):
        return ()
    return tuple(
        DeleteFailure(str(item.get("receiptHandle", "")), _int(item.get("code")), str(item.get("message", "")))
        for item in items
        if isinstance(item, dict)
    )


def parse_messages(answer: Mapping[str, Any]) -> list[Message]:
    """Pure: the ``msgInfoList`` of a BatchReceiveMessage answer; a malformed one is a retryable error."""
    items = answer.get("msgInfoList")
    if not isinstance(items, list):
        raise CmqError("BatchReceiveMessage", NETWORK, "the answer has no msgInfoList")
    messages = []
    for item in items:
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("msgId", "receiptHandle")):
            raise CmqError("BatchReceiveMessage", NETWORK, f"a message without msgId or receiptHandle: {item!r:.200}")
        body = item.get("msgBody")
        messages.append(
            Message(
                msg_id=item["msgId"],
                body=body if isinstance(body, str) else json.dumps(body),
                receipt_handle=item["receiptHandle"],
                enqueue_time=_int(item.get("enqueueTime")),
                next_visible_time=_int(item.get("nextVisibleTime")),
                first_dequeue_time=_int(item.get("firstDequeueTime")),
                dequeue_count=_int(item.get("dequeueCount")),
            )
        )
    return messages


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
