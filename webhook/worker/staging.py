"""Staged downloads: a job's object is fetched once and kept until none of its deliveries is left
to retry, instead of once per attempt.

A download is written to a ``.part`` file named after the worker, checked (length, CRC64), then
renamed into place with a small JSON file describing it, so a staged object is always whole.
A staged file is never changed once in place (a new download replaces it by rename; recency is
kept on its JSON file): the filesystem sink may hard-link it, and a delivered file shares its inode.
Staged objects beyond the byte budget are evicted least recently used first, except those in use;
``.part`` files of workers that are no longer alive are removed when the worker takes over from them.

The threads of one worker share a :class:`Staging`, each working on another job. A thread's job is
in use from the moment the thread fetches it until the thread releases it, fetches another job or
ends: that covers the download and the deliveries from it, and pins at most one job per thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Collection
from dataclasses import asdict
from pathlib import Path

from webhook.ci.client import Client
from webhook.ci.fetch import PART_PREFIX, fetch_object
from webhook.deadline import DEFAULT_MIN_RATE
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
        # Publishing, releasing and evicting hold it, so that the byte count each eviction works
        # from is not changed under it and a job marked in use stays where it is.
        self._lock = threading.Lock()
        self._in_use: dict[threading.Thread, str] = {}

    def fetch(self, client: Client, job_id: str, where: ObjectLocation, md5: str = "") -> FetchedFile:
        """The job's object, from staging when an earlier attempt downloaded it, else from COS.

        The job is in use by the calling thread from now on (see the module's docstring).
        """
        with self._lock:
            self._in_use[threading.current_thread()] = job_id
        if (staged := self.staged(job_id, where)) is not None:
            log.info("reusing the staged download of %s", where.key, extra={"job_id": job_id})
            return staged
        self.directory.mkdir(parents=True, exist_ok=True)
        part_prefix = f"{PART_PREFIX}{self.tag}-"
        fetched = fetch_object(
            client, where, str(self.directory), min_rate=self.min_rate, part_prefix=part_prefix, md5=md5
        )
        assert fetched.path is not None
        data, meta = self._paths(job_id)
        description = asdict(fetched) | {"path": None, "where": asdict(where)}
        temporary = meta.with_suffix(f".{self.tag}.tmp")
        temporary.write_text(json.dumps(description))
        with self._lock:
            os.replace(fetched.path, data)
            os.replace(temporary, meta)
            self._evict()
        return FetchedFile(**(asdict(fetched) | {"path": str(data)}))

    def staged(self, job_id: str, where: ObjectLocation) -> FetchedFile | None:
        """The staged download of ``where`` for the job, if a whole one is here."""
        data, meta = self._paths(job_id)
        try:
            description = json.loads(meta.read_text())
            if description.pop("where") != asdict(where) or data.stat().st_size != description["size"]:
                return None
            # Recently used: evicted last. The description's time, not the data's: that inode may be a delivered file.
            os.utime(meta)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return FetchedFile(**(description | {"path": str(data)}))

    def release(self, job_id: str) -> None:
        """No delivery of the job is left to retry: its download goes, and it is no longer in use."""
        with self._lock:
            self._in_use = {thread: job for thread, job in self._in_use.items() if job != job_id}
            self._remove(job_id)

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

    def _remove(self, name: str) -> None:
        # Unlinks only these names: a hard link the filesystem sink made keeps the bytes.
        for path in self._paths(name):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _evict(self) -> None:
        """Least recently used staged downloads go first until the rest fit the budget; jobs in use stay.

        Called with the lock held.
        """
        self._in_use = {thread: job for thread, job in self._in_use.items() if thread.is_alive()}
        in_use = {self._paths(job)[0] for job in self._in_use.values()}
        staged = []
        for data in self.directory.glob("*.staged"):
            with contextlib.suppress(FileNotFoundError):
                size = data.stat().st_size
                try:
                    used = data.with_suffix(".json").stat().st_mtime
                except FileNotFoundError:
                    used = 0.0  # no description: never reusable, so first to go
                staged.append((used, size, data))
        total = sum(size for _, size, _ in staged)
        for _, size, data in sorted(staged):
            if total <= self.max_bytes:
                break
            if data not in in_use:
                self._remove(data.stem)
                total -= size
                log.info("evicted the staged download %s to stay within WEBHOOK_STAGING_MAX_BYTES", data.name)
