"""Sinks: where verified jobs go. Each receives :class:`~webhook.models.Event` objects.

:class:`Sink` is the interface; :class:`NotificationSink` the base of sinks that send a message
saying where the file is instead of the file. Which types exist, and how one is built from its
``[[sinks]]`` table, is in :mod:`webhook.sinks.registry`; building them, in :mod:`webhook.sinks.build`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from webhook.config_values import CosEndpoint
from webhook.deadline import DEFAULT_MIN_RATE, DEFAULT_TIMEOUT
from webhook.errors import ConfigError
from webhook.models import Event, FileLocation, Job, JobFile, ObjectLocation
from webhook.sinks.options import NotifyOptions

if TYPE_CHECKING:  # webhook.ci imports the settings, which import the sink options
    from webhook.ci.credentials import CredentialSource

PresignSource = Callable[[ObjectLocation, int], str]
"""Presigns a GET of CI's output object for this many seconds, with the service's own credentials."""


class DeliveryError(Exception):
    """A delivery that did not happen; the worker decides whether and when to retry.

    ``retry_after`` is how many seconds the remote asked us to wait, if it said so.
    ``permanent`` means retrying the same event cannot help (for example a 400 answer).
    ``code`` is the remote's status or error code when it answered (``"503"``, ``"NOAUTH"``).
    """

    def __init__(
        self, message: str, *, retry_after: float | None = None, permanent: bool = False, code: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.permanent = permanent
        self.code = code


@dataclass(frozen=True)
class BuildContext:
    """What building a sink may need beyond its options: secrets by variable name, the COS endpoint.

    ``cos_timeout`` and ``min_transfer_rate`` set the deadlines of sinks that talk to COS, and the
    time every sink that moves the file gets for its bytes.
    """

    environ: Mapping[str, str] = field(repr=False)
    cos_endpoint: CosEndpoint | None = None
    cos_timeout: float = DEFAULT_TIMEOUT
    min_transfer_rate: int = DEFAULT_MIN_RATE
    # The service's own COS keys (COS_SECRET_ID/KEY/TOKEN, or its CAM role's), for sinks that use them.
    cos_credentials: CredentialSource | None = None

    def secret(self, sink: str, variable: str | None, required: bool = True) -> str | None:
        """The value of ``variable`` (None when unnamed, or unset and not ``required``)."""
        if variable is None:
            return None
        value = self.environ.get(variable, "")
        if not value and required:
            raise ConfigError(f"sink {sink}: environment variable {variable} is not set")
        return value or None


class Sink:
    """A destination for events. Subclasses implement :meth:`from_options`, :meth:`deliver`, usually :meth:`check`."""

    name: str

    @classmethod
    def from_options(cls, name: str, options: Any, context: BuildContext) -> Sink:
        """The sink declared as ``name`` with ``options`` (its type's model in :mod:`webhook.sinks.options`)."""
        raise NotImplementedError

    def deliver(self, event: Event) -> None:
        """Deliver ``event``; idempotent per ``event.event_id``; raise :class:`DeliveryError` on failure."""
        raise NotImplementedError

    def needs_bytes(self, job: Job) -> bool:
        """Whether delivering ``job`` needs its output downloaded (each of ``event.files`` with its ``path`` set)."""
        return True

    def location(
        self, job: Job, presign_seconds: int | None = None, file: JobFile | None = None
    ) -> FileLocation | None:
        """Where this sink puts ``job``'s ``file`` (None: its one file), for notifications that point
        at it; None if it keeps none."""
        return None

    def target(self) -> str:
        """Where this sink delivers, fit to print: no password, token or query secret in it."""
        return ""

    def check(self) -> str:
        """Try the connection; return what was checked, or raise :class:`DeliveryError` saying why not."""
        return "nothing to check"

    def close(self) -> None:
        """Release connections and handles; the sink is not used afterwards."""


class NotificationSink(Sink):
    """A sink that sends a message saying where the file is (``file.location``), never the bytes."""

    options: NotifyOptions

    def needs_bytes(self, job: Job) -> bool:
        return False

    def locate(
        self, job: Job, file: JobFile, stored: Mapping[str, Sink], presign_source: PresignSource
    ) -> FileLocation | None:
        """Where the message says ``job``'s ``file`` is.

        With ``file_from``, the copy that storage sink made (it must be among ``stored``, the sinks
        that already have the job: otherwise this delivery waits for it); else the object CI wrote.
        """
        presign = self.options.presign_seconds
        if self.options.file_from is not None:
            store = stored.get(self.options.file_from)
            if store is None:
                raise DeliveryError(f"{self.name}: waiting for sink {self.options.file_from} to store the file")
            return store.location(job, presign, file)
        source = file.source
        url = presign_source(source, presign) if presign else ""
        return FileLocation("source", source.bucket, source.key, source.region, url=url)
