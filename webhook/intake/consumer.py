"""``cos-webhook consume``: receive CI's callbacks from TDMQ (CMQ) queues instead of over HTTP.

For each queue, one thread loops: long-poll a batch (BatchReceiveMessage), record each message
exactly as ``POST /callback`` records a body (parse, then
:func:`~webhook.intake.record.record_callback`; a job already known is a duplicate), then delete the
batch's receipt handles, only after those commits. A message that is not a readable callback, or
that the ledger refuses, is kept in the ledger with the reason (:mod:`webhook.ledger.quarantine`)
and deleted once kept, so it cannot block the queue. Delivery is at least once: a message whose
delete is lost, or that was in hand when the process died, comes back after the queue's
visibility timeout and is recorded again as a duplicate, which changes nothing.

Rate limits (4420), server and network errors, and a ledger outage are waited out with backoff
and jitter; bad credentials (4100) or a missing queue (4440) stop the consumer with a message
saying what to fix. SIGTERM stops receiving at once (a long poll in flight is cut: whatever it
would have handed over comes back after the visibility timeout), lets the batch in hand be
recorded and deleted, and exits within ``WEBHOOK_SHUTDOWN_SECONDS``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from webhook.deadline import Deadline
from webhook.intake.callback import CallbackError, parse_callback
from webhook.intake.record import record_callback
from webhook.intake.tdmq import AUTH_FAILED, NO_QUEUE, STALE_HANDLE, CmqClient, CmqError, Message
from webhook.ledger import MAX_VERSIONS_PER_JOB, KeptMessage, Ledger, LedgerRefused, LedgerUnavailable, RawRequest
from webhook.models import Callback
from webhook.retry import RetryPolicy, backoff_delay
from webhook.worker.services import Services, Shutdown

log = logging.getLogger(__name__)

REMOTE_ADDR = "tdmq"  # where a callback came from, in the ledger (an HTTP one has the client's address)
_DOCUMENT_STARTS = ("<", "{", "[")
_IDLE_PAUSE = 1.0


class Unreadable(ValueError):
    """A message that is not a callback cos-webhook can record; the message says why."""


@dataclass(frozen=True)
class Read:
    """A message read as a callback: the document's bytes, how they were wrapped, what they say."""

    body: bytes
    encoding: str  # "text", or "base64" when the message body wrapped the document
    callback: Callback


def read_message(text: str) -> Read:
    """Pure: the callback a message body carries, as the document itself or base64 of it (detected by
    content: CI's TDMQ message format is not published). Raise :class:`Unreadable` with the reason."""
    body, encoding = _unwrap(text)
    try:
        return Read(body, encoding, parse_callback(body))
    except CallbackError as exc:
        raise Unreadable(
            exc.message if encoding == "text" else f"base64 of a document that is not readable: {exc.message}"
        ) from None


def _unwrap(text: str) -> tuple[bytes, str]:
    if not text.strip():
        raise Unreadable("the message body is empty")
    if text.lstrip("\ufeff \t\r\n").startswith(_DOCUMENT_STARTS):
        return text.encode("utf-8", "surrogatepass"), "text"
    try:
        inner = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise Unreadable("the message body is neither XML, JSON nor base64") from None
    if not inner.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(tuple(s.encode() for s in _DOCUMENT_STARTS)):
        raise Unreadable("the message body is base64, but not of an XML or JSON document")
    return inner, "base64"


def _content_type(read: Read) -> str:
    # A message has no Content-Type: the one its document was read as stands in for it.
    return f"application/{read.callback.body_format}"


def explain(exc: CmqError, queue: str, endpoint: str) -> str:
    """Pure: what an operator should fix when TDMQ refuses for good."""
    if exc.code == AUTH_FAILED:
        return (
            f"TDMQ at {endpoint} refused {exc.action} on queue {queue} (code 4100: {exc.message}): check "
            "TDMQ_SECRET_ID and TDMQ_SECRET_KEY (or COS_SECRET_ID and COS_SECRET_KEY), and that their CAM "
            f"policy allows tdmq:BatchReceiveMessage and tdmq:BatchDeleteMessage on queue {queue}"
        )
    if exc.code == NO_QUEUE:
        return (
            f"TDMQ at {endpoint} has no queue {queue} (code 4440: {exc.message}): check WEBHOOK_TDMQ_QUEUE, "
            "and WEBHOOK_TDMQ_REGION or WEBHOOK_TDMQ_ENDPOINT"
        )
    return f"TDMQ at {endpoint} refused {exc.action} on queue {queue} for good: {exc}"


class ConsumerStopped(Exception):
    """TDMQ refused for good (credentials, policy, queue name): retrying cannot help."""


class QueueLoop:
    """A consumer's service for one queue: receive, record, delete, until stopped."""

    def __init__(self, consumer: Consumer, queue: str) -> None:
        self.consumer = consumer
        self.queue = queue
        self.name = f"consume {queue}"

    def run(self, stopping: threading.Event) -> None:
        self.consumer.consume(self.queue, stopping)


def _hard_stop() -> None:
    # Stuck in a call no deadline covers: what is in hand comes back after the visibility timeout.
    log.error("consumer stopped hard after its shutdown budget")
    os._exit(1)


class Consumer:
    """Consumes ``queues``, one service each, until :meth:`stop` (or a signal) or a refusal for good."""

    def __init__(
        self,
        client: CmqClient,
        ledger: Ledger,
        queues: Sequence[str],
        allowed_tags: frozenset[str],
        *,
        batch: int = 16,
        wait: int = 30,
        shutdown_seconds: float = 25.0,
        patience: RetryPolicy = RetryPolicy(backoff_base=1.0, backoff_cap=30.0),
        max_versions: int = MAX_VERSIONS_PER_JOB,
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.queues = tuple(queues)
        self.allowed_tags = allowed_tags
        self.max_versions = max_versions
        self.batch = batch
        self.wait = wait
        self.patience = patience
        self.quarantine = ledger.quarantine
        # Stopping cuts the long polls in flight at once: whatever they would have handed over
        # comes back after the visibility timeout. Batches in hand get the budget.
        self.shutdown = Shutdown(shutdown_seconds, "consumer", _hard_stop, interrupt=self._cut_polls)
        self.stopping = self.shutdown.stopping
        self.failure: str | None = None
        self._lock = threading.Lock()  # a poll is registered, or the shutdown has begun, never both unseen
        self._polls: set[Deadline] = set()

    # -- running ------------------------------------------------------------------------------

    def run(self) -> None:
        """Consume until stopped; raise :class:`ConsumerStopped` if TDMQ refused for good."""
        log.info(
            "consumer started endpoint=%s queues=%s batch=%d wait=%ds",
            self.client.endpoint,
            ",".join(self.queues),
            self.batch,
            self.wait,
        )
        Services([QueueLoop(self, queue) for queue in self.queues], self.shutdown).run()
        log.info("consumer stopped")
        if self.failure is not None:
            raise ConsumerStopped(self.failure)

    def stop(self, why: str) -> None:
        """Receive no more: cut the long polls in flight; batches in hand are finished."""
        self.shutdown.begin(why)

    def install_signal_handlers(self) -> None:
        self.shutdown.install_signal_handlers()

    def _cut_polls(self) -> None:
        with self._lock:
            polls = list(self._polls)
        for poll in polls:
            poll.expire_now("consumer stopping")

    def consume(self, queue: str, stopping: threading.Event) -> None:
        """Poll ``queue`` until stopped, waiting out what may pass; a refusal for good stops the consumer."""
        failures = 0
        while not stopping.is_set() and not self.stopping.is_set():
            try:
                received = self.poll_once(queue)
                failures = 0
                if not received and self.wait < 1:
                    stopping.wait(_IDLE_PAUSE)  # no long polling: do not ask again at once
                continue
            except CmqError as exc:
                if self.stopping.is_set():
                    break
                if exc.fatal:
                    self.failure = explain(exc, queue, self.client.endpoint)
                    log.error("consumer stopping: %s", self.failure)
                    self.stop("refused for good")
                    break
                problem = str(exc)
            except LedgerUnavailable as exc:
                problem = str(exc)
            except Exception as exc:  # anything unforeseen: the messages come back, try again later
                log.exception("consumer of queue %s failed", queue)
                problem = f"{type(exc).__name__}: {exc}"
            failures += 1
            delay = backoff_delay(failures, self.patience)
            log.warning("queue %s: %s; trying again in %.1fs", queue, problem, delay)
            stopping.wait(delay)

    # -- one batch ----------------------------------------------------------------------------

    def poll_once(self, queue: str) -> int:
        """Receive one batch from ``queue``, record it, delete what was stored; how many messages came."""
        messages = self._receive(queue)
        stored: list[str] = []
        outage: LedgerUnavailable | None = None
        for message in messages:
            try:
                self._take(queue, message)
            except LedgerUnavailable as exc:
                outage = exc  # this one and the rest come back after the visibility timeout
                break
            stored.append(message.receipt_handle)
        self._delete(queue, stored)
        if outage is not None:
            raise outage
        return len(messages)

    def _receive(self, queue: str) -> list[Message]:
        with Deadline(self.wait + self.client.timeout + 5, f"CMQ receive from {queue}") as poll:
            with self._lock:
                if self.stopping.is_set():
                    return []
                self._polls.add(poll)
            try:
                return self.client.receive(queue, self.batch, self.wait)
            finally:
                with self._lock:
                    self._polls.discard(poll)

    def _take(self, queue: str, message: Message) -> None:
        """Record the message as a callback, or keep it as unreadable; either way it is committed on return."""
        try:
            read = read_message(message.body)
        except Unreadable as exc:
            self._keep(queue, message, str(exc))
            return
        headers = {"X-Tdmq-Queue": queue, "X-Tdmq-Msg-Id": message.msg_id, "X-Tdmq-Body": read.encoding}
        raw = RawRequest(body=read.body, content_type=_content_type(read), headers=headers, remote_addr=REMOTE_ADDR)
        try:
            recorded = record_callback(self.ledger, raw, read.callback, self.allowed_tags, self.max_versions)
        except LedgerRefused as exc:
            # Not the ledger's health but this message's content: kept, rather than back for ever.
            self._keep(queue, message, f"the ledger refused it: {exc.kind}: {exc.detail}")
            return
        log.info(
            "tdmq message stored queue=%s msg=%s callback=%s event=%s new=%s duplicate=%s ignored=%s",
            queue,
            message.msg_id,
            recorded.callback_id,
            read.callback.event_name,
            ",".join(recorded.job_ids) or "-",
            ",".join(recorded.duplicates) or "-",
            ",".join(recorded.ignored) or "-",
        )

    def _keep(self, queue: str, message: Message, reason: str) -> None:
        kept = self.quarantine.keep(queue, message.msg_id, message.body.encode("utf-8", "surrogatepass"), reason)
        log.warning(
            "tdmq message kept as unreadable queue=%s msg=%s id=%d reason=%s", queue, message.msg_id, kept, reason
        )

    def _delete(self, queue: str, handles: list[str]) -> None:
        """Delete what is stored. Failing is harmless: the messages come back and are duplicates then."""
        if not handles:
            return
        try:
            failures = self.client.delete(queue, handles)
        except CmqError as exc:
            if exc.fatal:
                raise
            log.warning(
                "queue %s: %d stored messages not deleted (%s): they come back as duplicates", queue, len(handles), exc
            )
            return
        for failure in failures:
            hint = " (stored after its visibility timeout: raise the queue's VisibilityTimeout?)"
            log.warning(
                "queue %s: a stored message not deleted: code %d %s%s",
                queue,
                failure.code,
                failure.message,
                hint if failure.code == STALE_HANDLE else "",
            )


@dataclass(frozen=True)
class Reparsed:
    message_id: int
    ok: bool
    detail: str  # the callback and its jobs, or why it is still unreadable


def reparse(ledger: Ledger, allowed_tags: frozenset[str], kept: KeptMessage, max_versions: int) -> Reparsed:
    """Read a kept message again (after a fix); record it as a callback if it is readable now."""
    quarantine = ledger.quarantine
    try:
        read = read_message(kept.body.decode("utf-8", "surrogatepass"))
    except (Unreadable, UnicodeDecodeError) as exc:
        quarantine.refuse(kept.id, str(exc))
        return Reparsed(kept.id, False, str(exc))
    headers = {
        "X-Tdmq-Queue": kept.queue,
        "X-Tdmq-Msg-Id": kept.msg_id,
        "X-Tdmq-Body": read.encoding,
        "X-Reparsed-From": f"message {kept.id}",
    }
    raw = RawRequest(body=read.body, content_type=_content_type(read), headers=headers, remote_addr=REMOTE_ADDR)
    recorded = record_callback(ledger, raw, read.callback, allowed_tags, max_versions)
    quarantine.resolve(kept.id, recorded.callback_id)
    jobs = ",".join((*recorded.job_ids, *recorded.duplicates)) or "no job"
    return Reparsed(kept.id, True, f"recorded as callback {recorded.callback_id} ({jobs})")
