"""Download a job's output object from COS to a local file, streamed and integrity-checked."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode

from qcloud_cos import CosS3Client

from webhook.ci.client import COS, SDK_ERRORS, cloud_error, cos_deadline, signing_token
from webhook.ci.crc64 import crc64ecma
from webhook.deadline import DEFAULT_MIN_RATE, transfer_budget
from webhook.models import FetchedFile, ObjectLocation

# Each download in flight holds one chunk, and a worker runs at most one per claim thread; past
# 256 KiB, larger chunks buy no speed (bench/fetch_memory.py), only memory.
CHUNK = 256 * 1024
PART_PREFIX = "cos-webhook-"  # of partial downloads (see webhook.worker.staging for their cleanup)


_MD5 = re.compile(r"[0-9a-fA-F]{32}")  # an ETag that is the object's MD5 (a multipart upload's is not)


class FetchError(Exception):
    """The object could not be fetched intact; worth retrying."""


def fetch_object(
    client: CosS3Client,
    where: ObjectLocation,
    temp_dir: str | None = None,
    *,
    timeout: float | None = None,
    min_rate: int = DEFAULT_MIN_RATE,
    part_prefix: str = PART_PREFIX,
    md5: str = "",
) -> FetchedFile:
    """Stream ``where`` into a temp file; check its length and CRC64 against COS's headers, and
    its MD5 against ``md5`` (what CI reported for the object) when one is given.

    The whole download has a deadline: ``timeout`` seconds (default: the client's) for COS to
    answer, plus the object's length at ``min_rate`` bytes/s once its headers say how long it is.
    Past it the download is abandoned and the partial file removed. The file is named
    ``<part_prefix><random>.part`` in ``temp_dir``; the caller owns it and must remove it.
    """
    with cos_deadline(client, f"COS GetObject {where.key}", timeout) as deadline:
        with _cos_errors(where):
            response: dict[str, Any] = client.get_object(Bucket=where.bucket, Key=where.key)
        headers = {k.lower(): v for k, v in response.items() if k != "Body"}
        deadline.extend(transfer_budget(0.0, _length(headers), min_rate))
        raw = response["Body"].get_raw_stream()
        fd, path = tempfile.mkstemp(prefix=part_prefix, suffix=".part", dir=temp_dir or None)
        size, crc = 0, 0
        # Only when CI gave one to compare with: hashing costs as much as the CRC64 again.
        digest = hashlib.md5(usedforsecurity=False) if md5 else None
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := raw.read(CHUNK, decode_content=False):
                    size += len(chunk)
                    crc = crc64ecma(chunk, crc)
                    if digest is not None:
                        digest.update(chunk)
                    out.write(chunk)
            _check(headers, size, crc, where)
            if digest is not None and digest.hexdigest() != md5:
                raise FetchError(f"{where.key} failed its MD5 check: CI says {md5}, got {digest.hexdigest()}")
        except Exception as exc:
            os.unlink(path)
            raw.close()  # the connection may hold the rest of the body: not reusable
            if deadline.expired:
                reason = deadline.passed_message()
                raise FetchError(f"download of {where.key} broke off after {size} bytes: {reason}") from None
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
        md5=md5,
    )


@contextmanager
def _cos_errors(where: ObjectLocation) -> Iterator[None]:
    try:
        yield
    except SDK_ERRORS as exc:
        raise FetchError(str(cloud_error(exc, COS, where.key))) from None


def _length(headers: dict[str, str]) -> int:
    value = headers.get("content-length", "")
    return int(value) if value.isascii() and value.isdigit() else 0


def _check(headers: dict[str, str], size: int, crc: int, where: ObjectLocation) -> None:
    expected_size = headers.get("content-length")
    if expected_size is not None and int(expected_size) != size:
        raise FetchError(f"{where.key} truncated: got {size} of {expected_size} bytes")
    expected_crc = headers.get("x-cos-hash-crc64ecma")
    if expected_crc is not None and expected_crc != str(crc):
        raise FetchError(f"{where.key} failed its CRC64 check: COS says {expected_crc}, got {crc}")


def describe_object(
    client: CosS3Client, where: ObjectLocation, *, timeout: float | None = None, md5: str = ""
) -> FetchedFile:
    """The object's size, CRC64 and type from a HEAD, for sinks that need no bytes.

    ``timeout`` (default: the client's) is the deadline of the whole exchange. ``md5`` (what CI
    reported) is compared with the ETag when that is an MD5, as it is for an object uploaded whole.
    """
    with cos_deadline(client, f"COS HeadObject {where.key}", timeout), _cos_errors(where):
        response: dict[str, Any] = client.head_object(Bucket=where.bucket, Key=where.key)
    headers = {k.lower(): v for k, v in response.items()}
    etag = headers.get("etag", "").strip('"')
    if md5 and _MD5.fullmatch(etag) and etag.lower() != md5:
        raise FetchError(f"{where.key} failed its MD5 check: CI says {md5}, COS's ETag says {etag.lower()}")
    return FetchedFile(
        path=None,
        size=int(headers.get("content-length", 0)),
        crc64=headers.get("x-cos-hash-crc64ecma", ""),
        content_type=headers.get("content-type", "application/octet-stream"),
        etag=etag,
        md5=md5,
    )


def presigned_url(client: CosS3Client, where: ObjectLocation, seconds: int) -> str:
    """A GET URL for ``where`` that works without credentials for ``seconds`` (or until the
    temporary keys that signed it expire, if sooner)."""
    url: str = client.get_presigned_url(Bucket=where.bucket, Key=where.key, Method="GET", Expired=seconds)
    if token := signing_token(client):
        # COS takes a temporary key's token beside the signature, as x-cos-security-token.
        url += "&" + urlencode({"x-cos-security-token": token})
    return url
