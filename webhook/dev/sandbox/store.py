"""Objects on local disk, with the metadata COS reports (size, ETag, CRC64, Content-Type, x-cos-meta-*).

Each object is two files in ``<root>/<bucket>/``: its bytes, named by the SHA-256 of its key so no
key can reach outside the root, and a JSON sidecar with its metadata. Bodies are streamed in and
out in chunks, so a 200 MiB object costs no more memory than a small one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from webhook.ci.crc64 import crc64ecma

CHUNK_SIZE = 1024 * 1024
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


class NoSuchKey(Exception):
    """The object does not exist."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    md5: str  # hex; COS quotes it as the ETag
    crc64: str  # decimal, as in x-cos-hash-crc64ecma
    content_type: str
    last_modified: float  # seconds since the epoch
    metadata: dict[str, str] = field(default_factory=dict)  # x-cos-meta-* headers, names lowercased


class ObjectStore:
    """A thread-safe bucket/key → bytes store under ``root``; buckets exist implicitly."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Held only while swapping files in or opening them, so that a reader never pairs new
        # bytes with old metadata; the slow part (copying the body) runs outside it.
        self._lock = threading.Lock()

    def object_path(self, bucket: str, key: str) -> Path:
        """Where the bytes of ``bucket``/``key`` are (or would be) stored."""
        if not BUCKET_NAME.fullmatch(bucket):
            raise ValueError(f"invalid bucket name {bucket!r}")
        return self.root / bucket / hashlib.sha256(key.encode()).hexdigest()

    def put(
        self,
        bucket: str,
        key: str,
        chunks: Iterable[bytes],
        content_type: str,
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        """Store the object from ``chunks``, replacing any previous version atomically."""
        path = self.object_path(bucket, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        md5, crc, size = hashlib.md5(usedforsecurity=False), 0, 0
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    md5.update(chunk)
                    crc = crc64ecma(chunk, crc)
                    size += len(chunk)
            info = ObjectInfo(
                key, size, md5.hexdigest(), str(crc), content_type, os.stat(tmp_name).st_mtime, dict(metadata or {})
            )
            with self._lock:
                os.replace(tmp_name, path)
                _write_json(_meta_path(path), asdict(info))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        return info

    def copy(
        self,
        source_bucket: str,
        source_key: str,
        bucket: str,
        key: str,
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> ObjectInfo:
        """Copy an object file to file; ``None`` keeps the source's content type or metadata.

        Raise :class:`NoSuchKey` if the source does not exist.
        """
        info, source = self.open(source_bucket, source_key)
        with source:
            return self.put(
                bucket,
                key,
                read_chunks(source),
                info.content_type if content_type is None else content_type,
                info.metadata if metadata is None else metadata,
            )

    def head(self, bucket: str, key: str) -> ObjectInfo:
        """The object's metadata; raise :class:`NoSuchKey` if it does not exist."""
        with self._lock:
            return _read_meta(self.object_path(bucket, key))

    def open(self, bucket: str, key: str) -> tuple[ObjectInfo, IO[bytes]]:
        """The object's metadata and its bytes opened for reading; the caller closes the file."""
        path = self.object_path(bucket, key)
        with self._lock:
            info = _read_meta(path)
            return info, path.open("rb")

    def delete(self, bucket: str, key: str) -> None:
        """Remove the object; removing a missing object is not an error (as in COS)."""
        path = self.object_path(bucket, key)
        with self._lock:
            for file in (path, _meta_path(path)):
                file.unlink(missing_ok=True)


def read_chunks(file: IO[bytes], length: int | None = None) -> Iterable[bytes]:
    """Yield ``file``'s bytes (at most ``length`` of them) in chunks."""
    remaining = length
    while remaining is None or remaining > 0:
        chunk = file.read(CHUNK_SIZE if remaining is None else min(CHUNK_SIZE, remaining))
        if not chunk:
            return
        if remaining is not None:
            remaining -= len(chunk)
        yield chunk


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _read_meta(path: Path) -> ObjectInfo:
    try:
        data = json.loads(_meta_path(path).read_text())
    except FileNotFoundError:
        raise NoSuchKey(path.name) from None
    return ObjectInfo(**data)


def _write_json(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
