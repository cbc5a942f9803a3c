"""Sinks: where verified jobs go. Each receives :class:`~webhook.models.Event` objects."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from webhook.config import ConfigError, Settings
from webhook.models import Event


class DeliveryError(Exception):
    """A delivery that did not happen; the worker decides whether and when to retry.

    ``retry_after`` is how many seconds the remote asked us to wait, if it said so.
    ``permanent`` means retrying the same event cannot help (for example a 400 answer).
    """

    def __init__(self, message: str, *, retry_after: float | None = None, permanent: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.permanent = permanent


class Sink(Protocol):
    """A destination for events."""

    name: str

    def deliver(self, event: Event) -> None:
        """Deliver ``event``; idempotent per ``event.event_id``; raise :class:`DeliveryError` on failure."""

    def close(self) -> None:
        """Release connections and handles; the sink is not used afterwards."""


def build_sinks(settings: Settings) -> dict[str, Sink]:
    """Every configured sink, by name; :class:`ConfigError` if one cannot be built from its settings."""
    # The sink modules import DeliveryError from this package, so they are imported here, not at the top.
    from webhook.sinks.filesystem import FilesystemSink
    from webhook.sinks.http import HttpSink

    sinks: list[Sink] = []
    if settings.sink_dir:
        sinks.append(FilesystemSink(Path(settings.sink_dir)))
    if settings.http_sink_url:
        try:
            sinks.append(HttpSink(settings.http_sink_url, settings.http_sink_secret, settings.http_sink_timeout))
        except ValueError as exc:
            raise ConfigError(f"WEBHOOK_HTTP_SINK_SECRET: {exc}") from None
    return {sink.name: sink for sink in sinks}
