"""Reading one field of a callback or of CI's answer: typed, bounded, and named in every error (pure).

Every reader raises :class:`CallbackError` with the field's place (``JobsDetail[0].Input.BucketId``),
so the endpoint can answer a 4xx naming the problem without storing anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from webhook.models import JobState, ObjectLocation

MAX_FIELD_LENGTH = 4096
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_STATES = ", ".join(s.value for s in JobState)
# Only a JSON escape ("\ud800") can produce one; no UTF-8 encoder, so neither database, accepts it.
_SURROGATE = re.compile("[\ud800-\udfff]")


class CallbackError(ValueError):
    """A callback that cannot be accepted; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def read_text(container: dict[str, Any], key: str, where: str) -> str:
    return as_text(container.get(key), f"{where}.{key}" if where else key)


def as_text(value: Any, name: str) -> str:
    if value is None:  # absent, or an empty XML element
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise CallbackError(f"{name} must be a string")
    text = str(value)
    if len(text) > MAX_FIELD_LENGTH:
        raise CallbackError(f"{name} is longer than {MAX_FIELD_LENGTH} characters")
    if "\x00" in text:  # no CI field holds one, and PostgreSQL text columns cannot store it
        raise CallbackError(f"{name} contains a NUL character")
    if _SURROGATE.search(text):  # stored as is, it made the ledger's INSERT fail: a 500, not a 400
        raise CallbackError(f"{name} contains an unpaired surrogate")
    return text


def is_blank(value: Any) -> bool:
    """An empty element: None in JSON or for ``<X/>``, only whitespace for an indented ``<X>\n</X>``."""
    return value is None or (isinstance(value, str) and not value.strip())


def repeated(value: Any) -> list[Any]:
    """An element that may appear once or repeated (XML), or be one value or a list (JSON); blanks dropped."""
    return [item for item in (value if isinstance(value, list) else [value]) if not is_blank(item)]


def each_object(container: dict[str, Any], key: str, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each element of the repeated ``key`` with where it is (``where.key[i]``); each must be an object."""
    for index, item in enumerate(repeated(container.get(key))):
        inner = f"{where}.{key}[{index}]"
        if not isinstance(item, dict):
            raise CallbackError(f"{inner} must be an object")
        yield inner, item


def read_object(container: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = container.get(key)
    if is_blank(value):
        return {}
    if not isinstance(value, dict):
        raise CallbackError(f"{where}.{key} must be an object")
    return value


def read_location(container: dict[str, Any], key: str, bucket_key: str, where: str) -> ObjectLocation | None:
    value = read_object(container, key, where)
    if not value:
        return None
    inner = f"{where}.{key}"
    return ObjectLocation(
        bucket=read_text(value, bucket_key, inner),
        region=read_text(value, "Region", inner),
        key=read_text(value, "Object", inner),
    )


def read_identity(item: dict[str, Any], where: str, tag_key: str) -> tuple[str, str, str]:
    """A job's id, tag (under ``tag_key``) and state, each checked."""
    job_id = read_text(item, "JobId", where)
    if not job_id:
        raise CallbackError(f"{where}: missing JobId")
    if not _JOB_ID.fullmatch(job_id):
        raise CallbackError(f"{where}.JobId must be 1 to 128 letters, digits, '-' or '_'")
    tag = read_text(item, tag_key, where)
    if not tag:
        raise CallbackError(f"{where}: missing {tag_key}")
    state = read_text(item, "State", where)
    if state not in JobState.__members__.values():
        raise CallbackError(f"{where}.State must be one of {_STATES}, not {state!r}")
    return job_id, tag, state
