"""Staged downloads: a job's object is fetched once and kept until none of its deliveries is left
to retry, instead of once per attempt.

A download is written to a ``.part`` file named after the worker, checked (length, CRC64), then
renamed into place with a small JSON file describing it, so a staged object is always whole.
Staged objects beyond the byte budget are evicted oldest first; ``.part`` files of workers that
are no longer alive are removed when the worker takes over from them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Collection
from dataclasses import asdict
from pathlib import Path

from qcloud_cos import CosS3Client

from webhook.deadline import DEFAULT_MIN_RATE
from webhook.fetch import PART_PREFIX, fetch_object
from webhook.models import FetchedFile, ObjectLocation

log = logging.getLogger("webhook.worker")

_SAFE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_PART = re.compile(re.escape(PART_PREFIX) + r"(?P<tag>[0-9a-f]{8})-.*\.part")
_ORPHAN_AGE = 600.0  # a .part file without a worker tag, untouched this long, belongs to no one


class Staging:
    """Whole, checked downloads in ``directory``, at most ``max_bytes`` of them, for worker ``tag``."""

    def __init__(self, directory: str, max_bytes: int, tag: str, min_rate: int = DEFAULT_MIN_RATE) -> None:
        self.directory = Path(directory or tempfile.gettempdir()) / "cos-webhook-staged"
        self.max_bytes = max_bytes
        self.tag = tag
        self.min_rate = min_rate

    def fetch(self, client: CosS3Client, job_id: str, where: ObjectLocation) -> FetchedFile:
        """The job's object, from staging when an earlier attempt downloaded it, else from COS."""
        if (staged := self.staged(job_id, where)) is not None:
            log.info("reusing the staged download of %s", where.key, extra={"job_id": job_id})
            return staged
        self.directory.mkdir(parents=True, exist_ok=True)
        part_prefix = f"{PART_PREFIX}{self.tag}-"
        fetched = fetch_object(client, where, str(self.directory), min_rate=self.min_rate, part_prefix=part_prefix)
        assert fetched.path is not None
        data, meta = self._paths(job_id)
        os.replace(fetched.path, data)
        description = asdict(fetched) | {"path": None, "where": asdict(where)}
        temporary = meta.with_suffix(f".{self.tag}.tmp")
        temporary.write_text(json.dumps(description))
        os.replace(temporary, meta)
        self._evict(keep=data)
        return FetchedFile(**(asdict(fetched) | {"path": str(data)}))

    def staged(self, job_id: str, where: ObjectLocation) -> FetchedFile | None:
        """The staged download of ``where`` for the job, if a whole one is here."""
        data, meta = self._paths(job_id)
        try:
            description = json.loads(meta.read_text())
            if description.pop("where") != asdict(where) or data.stat().st_size != description["size"]:
                return None
            os.utime(data)  # recently used: evicted last
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return FetchedFile(**(description | {"path": str(data)}))

    def release(self, job_id: str) -> None:
        """No delivery of the job is left to retry: its download goes."""
        for path in self._paths(job_id):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def sweep(self, live_tags: Collection[str]) -> int:
        """Remove partial downloads of workers not in ``live_tags``; returns how many."""
        removed = 0
        now = time.time()
        for part in self.directory.glob(f"{PART_PREFIX}*.part"):
            match = _PART.fullmatch(part.name)
            with contextlib.suppress(FileNotFoundError):
                if match is not None and match["tag"] in live_tags:
                    continue
                if match is None and now - part.stat().st_mtime < _ORPHAN_AGE:
                    continue
                part.unlink()
                removed += 1
        return removed

    def _paths(self, job_id: str) -> tuple[Path, Path]:
        name = job_id if _SAFE.fullmatch(job_id) else hashlib.sha256(job_id.encode()).hexdigest()
        return self.directory / f"{name}.staged", self.directory / f"{name}.json"

    def _evict(self, keep: Path) -> None:
        """Oldest staged downloads go first until the rest fit the budget (``keep`` stays)."""
        staged = []
        for path in self.directory.glob("*.staged"):
            with contextlib.suppress(FileNotFoundError):
                info = path.stat()
                staged.append((info.st_mtime, info.st_size, path))
        total = sum(size for _, size, _ in staged)
        for _, size, path in sorted(staged):
            if total <= self.max_bytes:
                break
            if path != keep:
                self.release(path.stem)
                total -= size
                log.info("evicted the staged download %s to stay within WEBHOOK_STAGING_MAX_BYTES", path.name)
