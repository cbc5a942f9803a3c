"""The sandbox's TDMQ for CMQ: the queue actions of ``POST /v2/index.php``, as TDMQ documents them.

Served on the sandbox's own address (a Host that names no bucket), so ``WEBHOOK_TDMQ_ENDPOINT``
is the sandbox's URL and the credentials are the sandbox's. Any valid queue name is a queue,
created on first use. The actions: SendMessage, ReceiveMessage, BatchReceiveMessage (long polling
up to ``pollingWaitSeconds``, 0 to 30), DeleteMessage and BatchDeleteMessage (``receiptHandle.n``;
6010 or 6020 with ``errorList``). A received message is invisible for the visibility timeout
(30 s unless the sandbox is made with another), then comes back with a new receipt handle; only
the latest handle deletes it, before it is visible again (else 4430). Every request is signed as
:mod:`webhook.intake.tdmq` says, checked here independently of that module (4100 when it does not match,
or ``Timestamp`` is more than five minutes off). The CI side puts a job's callback document here
when the job asks for ``CallBackType: TDMQ`` (:mod:`webhook.dev.sandbox.jobs`).

Chosen here, not confirmed against TDMQ: the message texts and ``requestId`` form; 4000 for a bad
parameter; the allowed clock skew; the 1 MiB message limit (4400 above it); that messages come back
in the order they were sent.

Faults (:class:`CmqFault`) make chosen actions fail: an HTTP 5xx, a CMQ error code (4420…), a
delay, or ``drop_reply``, where the action is carried out and the connection then closed with no
answer (a delete that happened, as far as the client can tell, or not). ``Sandbox.cmq.faults``
in a test, or JSON on :data:`FAULTS_PATH` for a running sandbox::

    curl -X POST http://127.0.0.1:9000/_sandbox/cmq/faults \\
         -d '{"action": "BatchDeleteMessage", "drop_reply": true, "rate": 0.3}'
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import random
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from werkzeug.wrappers import Request, Response

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger(__name__)

PATH = "/v2/index.php"
FAULTS_PATH = "/_sandbox/cmq/faults"
ACTIONS = ("SendMessage", "ReceiveMessage", "BatchReceiveMessage", "DeleteMessage", "BatchDeleteMessage")
QUEUE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,63}")
MAX_MESSAGE = 1024 * 1024
MAX_SKEW = 300
_LINGER_ABORT = struct.pack("ii", 1, 0)


class CmqFailure(Exception):
    """An action refused with a CMQ ``code``; ``extra`` goes into the answer too (``errorList``)."""

    def __init__(self, code: int, message: str, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra or {}


@dataclass(frozen=True)
class CmqFault:
    """Which requests (``action``, ``queue``), how often (``times``, ``rate`` from an RNG seeded
    with ``seed``), and what happens: ``delay`` s first, then an HTTP ``status``, a CMQ ``code``, or
    the action carried out and its reply dropped."""

    action: str | None = None
    queue: str | None = None
    times: int | None = None
    rate: float = 1.0
    seed: int = 0
    status: int | None = None
    code: int | None = None
    delay: float = 0.0
    drop_reply: bool = False

    def __post_init__(self) -> None:
        if self.action is not None and self.action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {self.action!r}")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be at least 1 (or null for every request)")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError("rate must be between 0 and 1")
        if self.status is not None and not 500 <= self.status <= 599:
            raise ValueError("status must be a server error, 500 to 599 (CMQ answers its own errors with code)")
        if not (math.isfinite(self.delay) and self.delay >= 0):
            raise ValueError("delay must be a number of seconds, not negative")
        if [self.status is not None, self.code is not None, self.drop_reply].count(True) > 1:
            raise ValueError("status, code and drop_reply exclude each other")
        if not (self.status or self.code or self.drop_reply or self.delay):
            raise ValueError("a fault needs an effect: status, code, delay or drop_reply")

    @classmethod
    def from_dict(cls, data: object) -> CmqFault:
        if not isinstance(data, dict):
            raise ValueError("a fault is a JSON object")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ValueError(f"unknown fault fields: {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(str(exc)) from None


@dataclass
class _Active:
    fault: CmqFault
    fired: int = 0
    rng: random.Random = field(default_factory=random.Random)


@dataclass
class _Message:
    msg_id: str
    body: str
    enqueue_time: float
    visible_at: float
    handle: str = ""  # the latest receipt handle; "" before the first receive
    first_dequeue_time: float = 0.0
    dequeue_count: int = 0

    def info(self) -> dict[str, Any]:
        return {
            "msgBody": self.body,
            "msgId": self.msg_id,
            "receiptHandle": self.handle,
            "enqueueTime": int(self.enqueue_time),
            "nextVisibleTime": int(self.visible_at),
            "firstDequeueTime": int(self.first_dequeue_time),
            "dequeueCount": self.dequeue_count,
        }


class CmqService:
    """Queues of messages, shared by every request thread; :meth:`app` serves them over HTTP."""

    def __init__(self, secret_id: str, secret_key: str, *, visibility_timeout: float = 30.0) -> None:
        self.secret_id = secret_id
        self.secret_key = secret_key
        self.visibility_timeout = visibility_timeout
        self.clock = time.time  # tests may move it
        self._queues: dict[str, dict[str, _Message]] = {}
        self._faults: list[_Active] = []
        self._changed = threading.Condition()
        self._closing = False
        self._generation = 0  # bumped by clear_faults: delays in progress end
        self._counter = 0
        self._actions: dict[str, Callable[[Mapping[str, str]], dict[str, Any]]] = {
            "SendMessage": self._send_message,
            "ReceiveMessage": self._receive_message,
            "BatchReceiveMessage": self._batch_receive,
            "DeleteMessage": self._delete_message,
            "BatchDeleteMessage": self._batch_delete,
        }

    # -- in-process use: the CI side and tests --------------------------------------------

    def send(self, queue: str, body: str, delay: float = 0.0) -> str:
        """Put ``body`` on ``queue`` (created if new); its msgId."""
        if not QUEUE_NAME.fullmatch(queue):
            raise CmqFailure(4000, f"(10110)queueName {queue!r}: 1 to 64 letters, digits and -, starting with a letter")
        if not body or len(body.encode()) > MAX_MESSAGE:
            raise CmqFailure(4400, f"(10580)msgBody must be 1 to {MAX_MESSAGE} bytes")
        now = self.clock()
        with self._changed:
            self._counter += 1
            msg_id = f"{self._counter}-{uuid.uuid4().hex[:12]}"
            self._queues.setdefault(queue, {})[msg_id] = _Message(msg_id, body, now, now + delay)
            self._changed.notify_all()
        return msg_id

    def pending(self, queue: str) -> int:
        """Messages on ``queue`` not yet deleted, visible or not."""
        with self._changed:
            return len(self._queues.get(queue, {}))

    def add_fault(self, fault: CmqFault) -> None:
        with self._changed:
            self._faults.append(_Active(fault, rng=random.Random(fault.seed)))

    def clear_faults(self) -> None:
        with self._changed:
            self._faults = []
            self._generation += 1
            self._changed.notify_all()

    def faults(self) -> list[dict[str, Any]]:
        with self._changed:
            return [asdict(active.fault) | {"fired": active.fired} for active in self._faults]

    def close(self) -> None:
        """Answer every long poll now (with no message)."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()

    # -- HTTP ---------------------------------------------------------------------------------

    def app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        if request.path == FAULTS_PATH:
            return self._faults_endpoint(request)(environ, start_response)
        request_id = uuid.uuid4().hex
        params = {**request.args.to_dict(), **request.form.to_dict()}
        fault: CmqFault | None = None
        try:
            self._authenticate(request.method, request.host, params)
            action = params.get("Action", "")
            if action not in ACTIONS:
                raise CmqFailure(4000, f"(10280)action {action!r} is not existed")
            fault = self._pick(action, params.get("queueName", ""))
            if fault is not None:
                self._sleep(fault.delay)
                if fault.status is not None:
                    return Response("injected by a sandbox fault", status=fault.status)(environ, start_response)
                if fault.code is not None:
                    raise CmqFailure(fault.code, "injected by a sandbox fault")
            answer = {"code": 0, "message": ""} | self._actions[action](params)
        except CmqFailure as exc:
            answer = {"code": exc.code, "message": exc.message} | exc.extra
        except Exception as exc:  # answered as CMQ would, so the client reports it instead of a parse error
            log.exception("sandbox CMQ request failed")
            answer = {"code": 6000, "message": f"(10000)internal error: {exc}"}
        if fault is not None and fault.drop_reply:
            sock = environ.get("werkzeug.socket")
            if isinstance(sock, socket.socket):
                # A reset, at once: werkzeug would otherwise keep the connection for a next request.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
                sock.shutdown(socket.SHUT_RDWR)
            # werkzeug takes a ConnectionError from the application for a client gone away.
            raise ConnectionAbortedError("sandbox fault: the reply is dropped")
        body = json.dumps(answer | {"requestId": request_id})
        return Response(body, content_type="application/json")(environ, start_response)

    def _authenticate(self, method: str, host: str, params: Mapping[str, str]) -> None:
        missing = [name for name in ("Action", "SecretId", "Nonce", "Timestamp", "Signature") if not params.get(name)]
        if missing:
            raise CmqFailure(4000, f"(10390)lacked of required parameter {missing[0]}")
        if params["SecretId"] != self.secret_id:
            raise CmqFailure(4100, f"(10104)the SecretId {params['SecretId']!r} is not known to this sandbox")
        if not params["Timestamp"].isdigit() or abs(int(params["Timestamp"]) - self.clock()) > MAX_SKEW:
            raise CmqFailure(4100, "(10103)Timestamp is more than five minutes from the sandbox's clock")
        if not verify_signature(self.secret_key, method, host, params):
            raise CmqFailure(4100, "(10104)the signature does not match the one calculated")

    def _pick(self, action: str, queue: str) -> CmqFault | None:
        with self._changed:
            for active in self._faults:
                fault = active.fault
                if (
                    fault.action in (None, action)
                    and fault.queue in (None, queue)
                    and (fault.rate >= 1.0 or active.rng.random() < fault.rate)
                ):
                    active.fired += 1
                    if fault.times is not None and active.fired >= fault.times:
                        self._faults.remove(active)
                    return fault
        return None

    def _sleep(self, seconds: float) -> None:
        """A fault's delay; :meth:`clear_faults` and :meth:`close` cut it short."""
        deadline = time.monotonic() + seconds
        with self._changed:
            generation = self._generation
            while not self._closing and generation == self._generation and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)

    def _faults_endpoint(self, request: Request) -> Response:
        try:
            if request.method == "POST":
                data = json.loads(request.get_data() or b"null")
                for item in data if isinstance(data, list) else [data]:
                    self.add_fault(CmqFault.from_dict(item))
            elif request.method == "DELETE":
                self.clear_faults()
            elif request.method != "GET":
                return Response(json.dumps({"error": "GET, POST or DELETE"}), 405, content_type="application/json")
        except ValueError as exc:
            return Response(json.dumps({"error": str(exc)}), 400, content_type="application/json")
        return Response(json.dumps({"faults": self.faults()}), content_type="application/json")

    # -- the actions ----------------------------------------------------------------------------

    def _send_message(self, params: Mapping[str, str]) -> dict[str, Any]:
        delay = _number(params, "delaySeconds", 0, 0, 3600)
        return {"msgId": self.send(_queue(params), params.get("msgBody", ""), delay)}

    def _receive_message(self, params: Mapping[str, str]) -> dict[str, Any]:
        [message] = self._receive(_queue(params), 1, _number(params, "pollingWaitSeconds", 0, 0, 30))
        return message

    def _batch_receive(self, params: Mapping[str, str]) -> dict[str, Any]:
        count = _number(params, "numOfMsg", None, 1, 16)
        return {"msgInfoList": self._receive(_queue(params), count, _number(params, "pollingWaitSeconds", 0, 0, 30))}

    def _delete_message(self, params: Mapping[str, str]) -> dict[str, Any]:
        errors = self._delete(_queue(params), [params.get("receiptHandle", "")])
        if errors:
            raise CmqFailure(errors[0]["code"], errors[0]["message"])
        return {}

    def _batch_delete(self, params: Mapping[str, str]) -> dict[str, Any]:
        queue = _queue(params)
        handles = _indexed(params, "receiptHandle")
        errors = self._delete(queue, handles)
        if not errors:
            return {}
        code = 6020 if len(errors) == len(handles) else 6010
        raise CmqFailure(code, "(10920)some messages were not deleted", {"errorList": errors})

    def _receive(self, queue: str, count: int, wait: float) -> list[dict[str, Any]]:
        until = time.monotonic() + wait
        with self._changed:
            while True:
                now = self.clock()
                messages = self._queues.setdefault(queue, {})
                ready = [m for m in messages.values() if m.visible_at <= now][:count]
                if ready:
                    for message in ready:
                        message.handle = f"{uuid.uuid4().hex}{message.msg_id}"
                        message.visible_at = now + self.visibility_timeout
                        message.first_dequeue_time = message.first_dequeue_time or now
                        message.dequeue_count += 1
                    return [message.info() for message in ready]
                left = until - time.monotonic()
                if left <= 0 or self._closing:
                    raise CmqFailure(7000, "(10200)no message")
                hidden = [m.visible_at - now for m in messages.values()]
                self._changed.wait(min([left, *hidden]))

    def _delete(self, queue: str, handles: list[str]) -> list[dict[str, Any]]:
        errors = []
        with self._changed:
            now = self.clock()
            messages = self._queues.setdefault(queue, {})
            by_handle = {m.handle: m for m in messages.values() if m.handle and m.visible_at > now}
            for handle in handles:
                message = by_handle.pop(handle, None)
                if message is None:
                    why = "(10750)receiptHandle is invalid or expired"
                    errors.append({"code": 4430, "message": why, "receiptHandle": handle})
                else:
                    del messages[message.msg_id]
        return errors


def verify_signature(secret_key: str, method: str, host: str, params: Mapping[str, str]) -> bool:
    """Whether ``Signature`` is the HMAC (SHA-256 if ``SignatureMethod`` says so, else SHA-1) of the request."""
    signed = "&".join(f"{k.replace('_', '.')}={params[k]}" for k in sorted(params) if k != "Signature")
    digest = hashlib.sha256 if params.get("SignatureMethod") == "HmacSHA256" else hashlib.sha1
    mac = hmac.new(secret_key.encode(), f"{method.upper()}{host}{PATH}?{signed}".encode(), digest)
    return hmac.compare_digest(base64.b64encode(mac.digest()).decode(), params.get("Signature", ""))


def _queue(params: Mapping[str, str]) -> str:
    queue = params.get("queueName", "")
    if not QUEUE_NAME.fullmatch(queue):
        raise CmqFailure(4000, f"(10110)queueName {queue!r}: 1 to 64 letters, digits and -, starting with a letter")
    return queue


def _number(params: Mapping[str, str], name: str, default: int | None, low: int, high: int) -> int:
    value = params.get(name)
    if value is None and default is not None:
        return default
    if value is None or not value.isdigit() or not low <= int(value) <= high:
        raise CmqFailure(4000, f"(10350)parameter {name} value or length is out of range ({low} to {high})")
    return int(value)


def _indexed(params: Mapping[str, str], name: str) -> list[str]:
    """``name.0``/``name.1``…: consecutive, from 0 or 1, as the document allows."""
    indexes = sorted(int(key[len(name) + 1 :]) for key in params if re.fullmatch(rf"{name}\.\d+", key))
    if not indexes or indexes[0] not in (0, 1) or indexes != list(range(indexes[0], indexes[0] + len(indexes))):
        raise CmqFailure(4000, f"(10380){name} parameter is not consequent")
    if len(indexes) > 16:
        raise CmqFailure(4000, f"(10370){name} parameter batch size is out of range")
    return [params[f"{name}.{index}"] for index in indexes]
