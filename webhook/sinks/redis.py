"""A sink that appends each event to a Redis stream (``XADD``): a notification, not the file."""

from __future__ import annotations

import json

import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, NoPermissionError, RedisError, ResponseError
from redis.retry import Retry
from redis.typing import EncodableT, FieldT

from webhook.errors import ConfigError
from webhook.models import Event
from webhook.sinks import BuildContext, DeliveryError, NotificationSink
from webhook.sinks.common import shown_url
from webhook.sinks.events import SCHEMA, event_document
from webhook.sinks.options import RedisOptions

TIMEOUT = 10.0  # seconds for connecting and for each command's answer
# Retrying cannot help until someone changes the credentials, the ACL or the key.
_PERMANENT = (AuthenticationError, AuthorizationError, NoPermissionError)


class RedisSink(NotificationSink):
    """``XADD <stream> MAXLEN ~ <maxlen> *`` with ``event_id``, ``type``, ``job_id``, ``schema`` and ``data``.

    ``data`` is the event's JSON document (:func:`webhook.sinks.events.event_document`), whose
    ``files`` say where each audio file is. Delivery is at least once: an entry whose reply was lost (a timeout
    after the command was sent) is added again on the next attempt, with the same ``event_id``,
    so consumers deduplicate on it. ``password`` (from ``password_env``) is used unless the URL
    carries its own.
    """

    options: RedisOptions

    def __init__(self, name: str, options: RedisOptions, *, password: str | None, timeout: float = TIMEOUT) -> None:
        self.name = name
        self.options = options
        self.stream = options.stream
        self.maxlen = options.maxlen
        try:
            self._client = redis.Redis.from_url(
                options.url,
                password=password,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                socket_keepalive=True,
                # One attempt per delivery: the worker's backoff decides when to try again, and a
                # silent resend after a timeout would add a duplicate entry.
                retry=Retry(NoBackoff(), 0),
                decode_responses=True,
            )
        except ValueError as exc:  # a bad query parameter, e.g. ?db=x
            raise ConfigError(f"sink {name}: options.url: {exc}") from None
        kwargs = self._client.connection_pool.connection_kwargs
        self.endpoint = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"

    @classmethod
    def from_options(cls, name: str, options: RedisOptions, context: BuildContext) -> RedisSink:
        return cls(name, options, password=context.secret(name, options.password_env))

    def deliver(self, event: Event) -> None:
        """Add one stream entry; :class:`DeliveryError` says whether retrying can help."""
        fields: dict[FieldT, EncodableT] = {
            "event_id": event.event_id,
            "type": event.type,
            "job_id": event.job.job_id,
            "schema": SCHEMA,
            "data": json.dumps(event_document(event), ensure_ascii=False),
        }
        try:
            self._client.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
        except RedisError as exc:
            raise self._error(exc) from exc

    def target(self) -> str:
        return f"{shown_url(self.options.url)} stream {self.stream}"

    def check(self) -> str:
        """PING, then make sure the stream key is a stream or does not exist yet."""
        try:
            self._client.ping()
            kind = str(self._client.type(self.stream))  # already str: responses are decoded
        except RedisError as exc:
            raise self._error(exc) from exc
        if kind not in ("none", "stream"):
            raise DeliveryError(
                f"{self.name}: key {self.stream} on {self.endpoint} holds a {kind}, not a stream", permanent=True
            )
        return "writable"

    def close(self) -> None:
        """Disconnect the client's connections."""
        self._client.close()

    def _error(self, exc: RedisError) -> DeliveryError:
        # WRONGTYPE: the key holds a list, hash, … and XADD will fail the same way until it is removed.
        permanent = isinstance(exc, _PERMANENT) or (isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE"))
        reason = str(exc) or type(exc).__name__
        return DeliveryError(f"{self.name}: redis {self.endpoint}: {reason}", permanent=permanent)
