"""What several sinks share: object names, metadata, readable error reasons, the bucket sinks' base."""

from __future__ import annotations

import posixpath
import re
import string
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from webhook.models import Event, Job, JobFile
from webhook.sinks import DeliveryError, Sink
from webhook.sinks.events import document_bytes
from webhook.sinks.options import CosOptions, S3Options

# Exactly one dot: what keeps the audio's name apart from the metadata document's (see audio_name).
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,8}")
# User metadata travels as HTTP headers, so it must be printable ASCII. Percent-encoding "%", spaces
# and everything non-ASCII keeps plain values readable and lets receivers always unquote().
_METADATA_SAFE = "".join(c for c in string.punctuation if c != "%")
# COS and S3 allow 2 KB of user metadata per object; longer user data is left to the JSON.
_USER_DATA_BUDGET = 1024


def audio_name(prefix: str, job: Job, file: JobFile | None = None) -> str:
    """The key or file name under which the storage sinks put a job's audio ``file`` (None: its
    one file, ``job.output``): ``<prefix><job_id><ext>`` when the job has one file, and
    ``<prefix><job_id>.<n><ext>`` for its ``n``-th of several, ``<ext>`` being that file's own.

    It never equals any job's :func:`document_name`, whatever the output keys, even compared
    case-insensitively: after ``<prefix>`` a job id has no dot (the callback parser allows only
    letters, digits, ``-`` and ``_``), ``<ext>`` holds exactly one dot, ``.<n><ext>`` two with
    digits between them, and ``.event.json`` two with ``event`` between them. For the same
    reason no two jobs' names meet, nor two files of one job.
    """
    if file is None:
        return prefix + job.job_id + file_extension(job.output.key if job.output else "")
    number = f".{file.number}" if file.count > 1 else ""
    return prefix + job.job_id + number + file_extension(file.source.key)


def audio_names(prefix: str, event: Event) -> tuple[str, ...]:
    """:func:`audio_name` of each of ``event``'s files, in their order."""
    return tuple(audio_name(prefix, event.job, file) for file in event.files)


def document_name(prefix: str, job: Job) -> str:
    """``<prefix><job_id>.event.json``: the key or file name of a job's metadata document."""
    return prefix + job.job_id + ".event.json"


def user_metadata(event: Event) -> dict[str, str]:
    """``job-id``, ``event-id`` and (if short enough) percent-encoded ``user-data`` for object metadata."""
    metadata = {"job-id": event.job.job_id, "event-id": event.event_id}
    user_data = quote(event.job.user_data, safe=_METADATA_SAFE)
    if user_data and len(user_data) <= _USER_DATA_BUDGET:
        metadata["user-data"] = user_data
    return metadata


def safe_content_type(value: str) -> str:
    if value and value.isascii() and value.isprintable() and "/" in value:
        return value
    return "application/octet-stream"


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` value (delta-seconds or an HTTP-date); ``None`` if absent or invalid."""
    value = (value or "").strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000" parses naive; HTTP dates are always UTC
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def shown_url(url: str) -> str:
    """``url`` fit to print: its user name kept, its password, query and fragment (any may hold a secret) dropped."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]  # not .hostname/.port: a bad port must not raise here
    user = parts.username  # may be "" in redis://:password@host
    return urlunsplit((parts.scheme, f"{user}@{host}" if user else host, parts.path, "", ""))


def os_reason(exc: BaseException) -> str:
    """The innermost operating-system reason ("Connection refused"), else the exception's type."""
    seen: set[int] = set()
    node: BaseException | None = exc
    reason = type(exc).__name__
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, OSError) and isinstance(node.strerror, str):
            reason = node.strerror
        nested = getattr(node, "reason", None)  # urllib3 keeps the cause here
        node = nested if isinstance(nested, BaseException) else node.__cause__ or node.__context__
    return reason


def printable(text: str) -> str:
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())[:200]


def file_extension(key: str) -> str:
    """The object key's suffix if it is a plain one (``.wav``, ``.mp3``), else ``.bin``."""
    _, extension = posixpath.splitext(posixpath.basename(key))
    return extension if _EXTENSION.fullmatch(extension) else ".bin"


def unreadable(sink: str, exc: OSError) -> DeliveryError:
    """The staged file could not be read (removed, disk error): worth another attempt."""
    return DeliveryError(f"{sink}: cannot read {exc.filename or 'the file'}: {exc.strerror or exc}")


class BucketSink(Sink):
    """The object-store sinks (cos, s3): ``<prefix><job_id><ext>`` and ``<prefix><job_id>.event.json`` in a bucket.

    Both SDKs take the same arguments for these calls; each subclass turns its SDK's errors
    into :class:`DeliveryError` in :meth:`_call`.
    """

    scheme: str  # of the URLs in messages: "cos" or "s3"
    options: CosOptions | S3Options
    _client: Any

    def _call(self, operation: str, key: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def target(self) -> str:
        """``cos://bucket/prefix (region)``, and the endpoint when the options name one."""
        options = self.options
        endpoint = options.endpoint if isinstance(options, CosOptions) else options.endpoint_url
        where = f"{self._url(options.prefix)} ({options.region})"
        return f"{where} at {shown_url(endpoint)}" if endpoint else where

    def _url(self, key: str) -> str:
        return f"{self.scheme}://{self.options.bucket}/{key}"

    def _put(self, key: str, body: Any, content_type: str, metadata: dict[str, str]) -> Any:
        return self._call(
            "put_object",
            key,
            self._client.put_object,
            Bucket=self.options.bucket,
            Key=key,
            Body=body,
            ContentType=content_type,
            Metadata=metadata,
        )

    def _head(self, key: str) -> Any:
        return self._call("head_object", key, self._client.head_object, Bucket=self.options.bucket, Key=key)

    def _put_document(self, event: Event, metadata: dict[str, str]) -> tuple[str, bytes, Any]:
        """Write the metadata document (last: its presence means every file it lists is complete)."""
        key = document_name(self.options.prefix, event.job)
        document = document_bytes(event, audio_names(self.options.prefix, event))
        return key, document, self._put(key, document, "application/json", metadata)
