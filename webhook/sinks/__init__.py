"""Sinks: where verified jobs go. Each receives :class:`~webhook.models.Event` objects.

A sink is declared in the configuration file (:mod:`webhook.sinks.config`) or, for the simple
case, by environment variables; :func:`webhook.sinks.config.build_sinks` builds them.
"""

from __future__ import annotations

from webhook.models import Event, FileLocation, Job


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


class Sink:
    """A destination for events. Subclasses implement :meth:`deliver` and usually :meth:`check`."""

    name: str

    def deliver(self, event: Event) -> None:
        """Deliver ``event``; idempotent per ``event.event_id``; raise :class:`DeliveryError` on failure."""
        raise NotImplementedError

    def needs_bytes(self, job: Job) -> bool:
        """Whether delivering ``job`` needs its output downloaded (``event.file.path`` set)."""
        return True

    def location(self, job: Job, presign_seconds: int | None = None) -> FileLocation | None:
        """Where this sink puts ``job``'s file, for notifications that point at it; None if it keeps none."""
        return None

    def check(self) -> str:
        """Try the connection; return what was checked, or raise :class:`DeliveryError` saying why not."""
        return "nothing to check"

    def close(self) -> None:
        """Release connections and handles; the sink is not used afterwards."""
