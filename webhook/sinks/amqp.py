"""A sink that publishes each event to an AMQP 0-9-1 exchange (RabbitMQ): a notification, not the file."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pika
from pika.exceptions import (
    AMQPError,
    AuthenticationError,
    ChannelClosedByBroker,
    ConnectionClosedByBroker,
    ProbableAccessDeniedError,
    ProbableAuthenticationError,
)

from webhook.errors import ConfigError
from webhook.models import Event
from webhook.sinks import BuildContext, DeliveryError, NotificationSink
from webhook.sinks.common import shown_url
from webhook.sinks.events import SCHEMA, event_document
from webhook.sinks.options import AmqpOptions

TIMEOUT = 10.0  # seconds for connecting and for each broker reply other than the publisher confirm
# Seconds; the client's value wins the negotiation. It lets the broker drop connections of clients
# that are gone, and is long because nothing answers heartbeats between deliveries (see usable()).
HEARTBEAT = 600
# ACCESS_REFUSED (permissions), PRECONDITION_FAILED (exchange declared with another type or
# arguments, message over the size limit), NOT_ALLOWED (vhost): retrying changes nothing.
_PERMANENT_CODES = frozenset({403, 406, 530})
_CLOSE_WAIT = 1.0  # seconds: a broker that answers at all answers a close at once


class AmqpSink(NotificationSink):
    """Publishes the event's JSON document to ``exchange`` with ``routing_key``, persistent and confirmed.

    Properties: ``message_id`` is the ``event_id``, ``type`` the event type, ``content_type``
    ``application/json``, headers ``job_id`` and ``schema``. The publish is ``mandatory``: a
    message no queue takes is returned and the delivery retried, as a queue may be bound later.
    Delivery is at least once (a confirm lost with the connection means publishing again), so
    consumers deduplicate on ``message_id``.

    Connections are opened on first use, reused, and opened again after a failure or a long idle
    spell. Like every pika connection each must be used from one thread at a time, so a delivery
    takes one no other thread is using (opening another if all are busy) and gives it back after:
    the sink keeps as many as deliveries ever ran at once (the worker's concurrency).
    """

    options: AmqpOptions

    def __init__(
        self,
        name: str,
        options: AmqpOptions,
        *,
        username: str | None,
        password: str | None,
        timeout: float = TIMEOUT,
    ) -> None:
        self.name = name
        self.options = options
        self.timeout = timeout
        try:
            self._parameters = _parameters(options, username, password, timeout)
        except ValueError as exc:  # a bad query parameter, e.g. ?heartbeat=x
            raise ConfigError(f"sink {name}: options.url: {exc}") from None
        self.endpoint = f"{self._parameters.host}:{self._parameters.port}"
        # Not one link behind a lock: a broker holding confirms back would then make each thread
        # wait out every other thread's confirm_timeout before its own began.
        self._idle: list[_Link] = []  # links no delivery is using, the most recently used last
        self._idle_lock = threading.Lock()

    @classmethod
    def from_options(cls, name: str, options: AmqpOptions, context: BuildContext) -> AmqpSink:
        return cls(
            name,
            options,
            username=context.secret(name, options.username_env),
            password=context.secret(name, options.password_env),
        )

    def deliver(self, event: Event) -> None:
        """Publish once and wait for the broker's confirm; :class:`DeliveryError` says whether retrying can help."""
        body = json.dumps(event_document(event), ensure_ascii=False).encode()
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent.value,
            message_id=event.event_id,
            type=event.type,
            headers={"job_id": event.job.job_id, "schema": SCHEMA},
        )
        refused = self._call(
            lambda link: link.publish(
                self.options.exchange, self.options.routing_key, body, properties, self.options.confirm_timeout
            )
        )
        if refused:
            raise DeliveryError(f"{self.name}: amqp {self.endpoint}: {refused}")

    def target(self) -> str:
        return f"{shown_url(self.options.url)} exchange {self.options.exchange} key {self.options.routing_key}"

    def check(self) -> str:
        """Connect and declare the exchange (or make sure it exists, with ``declare = false``)."""
        self._call(lambda link: None)
        return "accepts messages"

    def close(self) -> None:
        """Close the connections no delivery is using (all of them, once deliveries have ended)."""
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for link in idle:
            link.close()

    def _call(self, step: Callable[[_Link], str | None]) -> str | None:
        """Run ``step`` on a working link no other thread is using, opening one if needed; a failure drops it."""
        link: _Link | None = None
        try:
            link = self._take()
            if link is None:
                link = _Link(self._parameters, self.timeout)
                link.open(self.options.exchange, self.options.exchange_type, passive=not self.options.declare)
            result = step(link)
        except (AMQPError, _Timeout) as exc:
            if link is not None:
                link.close()
            cause = _innermost(exc)
            permanent = isinstance(cause, ProbableAuthenticationError | ProbableAccessDeniedError | AuthenticationError)
            if isinstance(cause, ChannelClosedByBroker | ConnectionClosedByBroker):
                permanent = cause.reply_code in _PERMANENT_CODES
            raise DeliveryError(f"{self.name}: amqp {self.endpoint}: {_reason(cause)}", permanent=permanent) from exc
        with self._idle_lock:
            self._idle.append(link)
        return result

    def _take(self) -> _Link | None:
        """The most recently used idle link that still works, or None; closes those that do not."""
        while True:
            with self._idle_lock:
                # Every link idle too long, not only the one taken: once fewer deliveries run at once
                # than before, the least recently used would otherwise sit until the broker drops them.
                stale = [link for link in self._idle if link.expiring()]
                self._idle = [link for link in self._idle if link not in stale]
                link = self._idle.pop() if self._idle else None
            for old in stale:
                old.close()
            if link is None or link.usable():
                return link
            link.close()  # gone: reconnect before publishing


class _Timeout(Exception):
    """The broker did not answer in time."""


class _Link:
    """A connection and a confirm-mode channel on pika's SelectConnection, driven one step at a time.

    Not BlockingConnection: its channel waits for a publisher confirm (and for declare replies)
    with no deadline, so a broker that holds confirms back (a quorum queue without a majority, a
    resource alarm) would hold the worker, and its lease, indefinitely. Running the asynchronous
    adapter's ioloop here puts a deadline on every step.
    """

    def __init__(self, parameters: pika.URLParameters, timeout: float) -> None:
        self.timeout = timeout
        self._failure: BaseException | None = None  # the first error a callback reported
        self._done = False  # set by the callback that ends the current step
        self._confirm: Any = None  # Basic.Ack or Basic.Nack of the message in flight
        self._returned: Any = None  # Basic.Return of the message in flight
        self._channel: Any = None
        self._closing = False
        self._used = time.monotonic()  # when a step last ran: sent or received something
        # Connecting starts in the ioloop, on the first _run (open).
        self._connection = pika.SelectConnection(
            parameters,
            on_open_callback=self._finish,
            on_open_error_callback=self._fail,
            on_close_callback=self._fail,
        )

    def open(self, exchange: str, exchange_type: str, *, passive: bool) -> None:
        """Connect, open a confirm-mode channel, and declare a durable ``exchange`` (``passive``: check it exists)."""
        # pika's own stack_timeout bounds connecting (per attempt the URL allows).
        self._run("connecting", None)
        self._connection.channel(on_open_callback=self._on_channel)
        self._run("opening a channel", self.timeout)
        self._channel.add_on_close_callback(self._fail)
        self._channel.add_on_return_callback(self._on_return)
        self._channel.confirm_delivery(self._on_confirm, callback=self._finish)
        self._run("enabling publisher confirms", self.timeout)
        self._channel.exchange_declare(exchange, exchange_type, passive=passive, durable=True, callback=self._finish)
        self._run(f"declaring exchange {exchange}", self.timeout)

    def publish(self, exchange: str, routing_key: str, body: bytes, properties: Any, timeout: float) -> str | None:
        """Publish one mandatory message and wait for its confirm; why the broker did not take it, or None."""
        self._confirm = self._returned = None
        self._channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)
        # A Basic.Return, if any, arrives before the confirm: waiting for the confirm sees both.
        self._run("waiting for the publisher confirm", timeout, lambda: self._confirm is not None)
        if isinstance(self._confirm, pika.spec.Basic.Nack):
            return f"exchange {exchange}: the broker nacked the message (a queue refused it, e.g. a full one)"
        if self._returned is not None:
            return (
                f"exchange {exchange} routed the message to no queue "
                f"(routing key {routing_key!r}: {self._returned.reply_text})"
            )
        return None

    def expiring(self) -> bool:
        """Whether the link has been idle so long that it should be closed rather than used."""
        # Between deliveries nothing answers the broker's heartbeats, and after about one heartbeat
        # timeout of silence it drops the connection (which pika then logs as an error with a
        # traceback). Closing it ourselves at half that time keeps that quiet; it costs a reconnect.
        heartbeat = self._connection.params.heartbeat  # as negotiated; 0 when off
        return bool(heartbeat) and time.monotonic() - self._used > heartbeat / 2

    def usable(self) -> bool:
        """Whether the link still works, after handling what arrived while it was idle (a close, EOF)."""
        if self._failure is None and self._connection.is_open:
            with contextlib.suppress(AMQPError):  # kept in _failure: the answer is False
                self._run("reading", 0, lambda: False)
        return self._failure is None and self._connection.is_open and self._channel.is_open

    def close(self) -> None:
        """Close the connection (waiting a moment for the broker's reply), then the ioloop."""
        self._closing = True
        self._failure = None  # already reported; from here on only the close matters
        if self._connection.is_open:
            self._connection.close()
        # pika closes the socket once the broker's CloseOk (or EOF) arrives; a broker that does not
        # answer leaves it to the garbage collector.
        with contextlib.suppress(_Timeout):
            self._run("closing", _CLOSE_WAIT, lambda: bool(self._connection.is_closed))
        self._connection.ioloop.close()

    def _run(self, what: str, timeout: float | None, until: Callable[[], bool] | None = None) -> None:
        """Run the ioloop until the step ends (``until()``, else a callback's :meth:`_finish`).

        Raises the error a callback reported, or :class:`_Timeout` after ``timeout`` seconds (0:
        handle only what already arrived; None: no deadline of our own).
        """
        ioloop = self._connection.ioloop
        ended = until or (lambda: self._done)
        self._done = expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            ioloop.stop()

        timer = ioloop.call_later(timeout, expire) if timeout is not None else None
        try:
            while not (ended() or expired or self._failure is not None):
                ioloop.start()  # every callback stops it, so the loop re-checks
        finally:
            if timer is not None:
                ioloop.remove_timeout(timer)
        if self._failure is not None:
            raise self._failure
        if expired and timeout:
            raise _Timeout(f"no answer within {timeout:g}s while {what}")
        self._used = time.monotonic()

    def _stop(self) -> None:
        self._connection.ioloop.stop()

    def _finish(self, *_: object) -> None:
        self._done = True
        self._stop()

    def _fail(self, _source: object, error: BaseException) -> None:
        # While closing, the channel and connection report their own close: not a failure.
        if self._failure is None and not self._closing:
            self._failure = error
        self._stop()

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        self._finish()

    def _on_confirm(self, frame: Any) -> None:
        self._confirm = frame.method
        self._stop()

    def _on_return(self, _channel: object, method: Any, _properties: object, _body: bytes) -> None:
        self._returned = method
        self._stop()


def _parameters(options: AmqpOptions, username: str | None, password: str | None, timeout: float) -> pika.URLParameters:
    """Connection parameters from the URL; our timeouts apply where its query sets none."""
    parameters = pika.URLParameters(options.url)
    if username is not None or password is not None:
        current = parameters.credentials
        parameters.credentials = pika.PlainCredentials(username or current.username, password or current.password)
    named = parse_qs(urlsplit(options.url).query)
    defaults: dict[str, float] = {
        "socket_timeout": timeout,
        "stack_timeout": timeout,
        "heartbeat": HEARTBEAT,
        # A broker short of memory or disk blocks publishers; give up like on a late confirm.
        "blocked_connection_timeout": options.confirm_timeout,
    }
    for key, value in defaults.items():
        if key not in named:
            setattr(parameters, key, value)
    return parameters


def _innermost(exc: BaseException) -> BaseException:
    """The error pika wraps when connecting fails (per attempt, per phase), else ``exc`` itself."""
    while True:
        attempts = getattr(exc, "exceptions", None)  # a failed connection workflow: one per attempt
        phase = getattr(exc, "exception", None)  # a failed connector phase
        if attempts:
            exc = attempts[-1]
        elif isinstance(phase, BaseException):
            exc = phase
        elif exc.args and isinstance(exc.args[0], BaseException):
            exc = exc.args[0]
        else:
            return exc


def _reason(exc: BaseException) -> str:
    """Short text for an innermost error: "Connection refused", "(404) NOT_FOUND - no exchange 'x' …"."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, ChannelClosedByBroker | ConnectionClosedByBroker):
        return f"({exc.reply_code}) {exc.reply_text}"
    if isinstance(exc, ProbableAuthenticationError | ProbableAccessDeniedError) and exc.args:
        return f"{type(exc).__name__}: {exc.args[0]}"
    return str(exc) or type(exc).__name__
