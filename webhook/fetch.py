"""Download a job's output object from COS to a local file, streamed and integrity-checked."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qcloud_cos import CosS3Client
from qcloud_cos.cos_exception import CosClientError, CosServiceError

from webhook.cos import client_error, service_error
from webhook.crc64 import crc64ecma
from webhook.models import FetchedFile, ObjectLocation

CHUNK = 1024 * 1024


class FetchError(Exception):
    """The object could not be fetched intact; worth retrying."""


def fetch_object(client: CosS3Client, where: ObjectLocation, temp_dir: str | None = None) -> FetchedFile:
    """Stream ``where`` into a temp file; check its length and CRC64 against COS's headers.

    The caller owns the returned file and must remove it.
    """
    with _cos_errors(where):
        response: dict[str, Any] = client.get_object(Bucket=where.bucket, Key=where.key)
    headers = {k.lower(): v for k, v in response.items() if k != "Body"}
    raw = response["Body"].get_raw_stream()
    fd, path = tempfile.mkstemp(prefix="cos-webhook-", suffix=".part", dir=temp_dir or None)
    size, crc = 0, 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := raw.read(CHUNK, decode_content=False):
                size += len(chunk)
                crc = crc64ecma(chunk, crc)
                out.write(chunk)
        _check(headers, size, crc, where)
    except Exception as exc:
        os.unlink(path)
        if isinstance(exc, FetchError):
            raise
        raise FetchError(f"download of {where.key} broke off after {size} bytes: {str(exc)[:200]}") from None
    finally:
        raw.release_conn()
    return FetchedFile(
        path=path,
        size=size,
        crc64=str(crc),
        content_type=headers.get("content-type", "application/octet-stream"),
        etag=headers.get("etag", "").strip('"'),
    )


@contextmanager
def _cos_errors(where: ObjectLocation) -> Iterator[None]:
    try:
        yield
    except CosServiceError as exc:
        code, detail = service_error(exc)
        raise FetchError(f"COS answered {code} for {where.key}: {detail}") from None
    except CosClientError as exc:
        raise FetchError(f"COS unreachable: {client_error(exc)}") from None


def _check(headers: dict[str, str], size: int, crc: int, where: ObjectLocation) -> None:
    expected_size = headers.get("content-length")
    if expected_size is not None and int(expected_size) != size:
        raise FetchError(f"{where.key} truncated: got {size} of {expected_size} bytes")
    expected_crc = headers.get("x-cos-hash-crc64ecma")
    if expected_crc is not None and expected_crc != str(crc):
        raise FetchError(f"{where.key} failed its CRC64 check: COS says {expected_crc}, got {crc}")


def describe_object(client: CosS3Client, where: ObjectLocation) -> FetchedFile:
    """The object's size, CRC64 and type from a HEAD, for sinks that need no bytes."""
    with _cos_errors(where):
        response: dict[str, Any] = client.head_object(Bucket=where.bucket, Key=where.key)
    headers = {k.lower(): v for k, v in response.items()}
    return FetchedFile(
        path=None,
        size=int(headers.get("content-length", 0)),
        crc64=headers.get("x-cos-hash-crc64ecma", ""),
        content_type=headers.get("content-type", "application/octet-stream"),
        etag=headers.get("etag", "").strip('"'),
    )


def presigned_url(client: CosS3Client, where: ObjectLocation, seconds: int) -> str:
    """A GET URL for ``where`` that works without credentials for ``seconds``."""
    url: str = client.get_presigned_url(Bucket=where.bucket, Key=where.key, Method="GET", Expired=seconds)
    return url


def sweep_staging(temp_dir: str | None, older_than: float = 600.0) -> int:
    """Remove downloads left by killed workers; returns how many.

    A live download writes every chunk, so a ``.part`` file untouched for ``older_than`` seconds
    belongs to no running worker.
    """
    directory = Path(temp_dir or tempfile.gettempdir())
    cutoff = time.time() - older_than
    removed = 0
    for stale in directory.glob("cos-webhook-*.part"):
        with contextlib.suppress(FileNotFoundError):
            if stale.stat().st_mtime < cutoff:
                stale.unlink()
                removed += 1
    return removed
