"""A sink that drops ``<job_id><ext>`` (``<job_id>.<n><ext>`` for each of several files) and
``<job_id>.event.json`` into a directory."""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO

from webhook.models import Event, FileLocation, Job, JobFile
from webhook.sinks import BuildContext, DeliveryError, Sink
from webhook.sinks.common import audio_name, audio_names, document_name
from webhook.sinks.events import document_bytes
from webhook.sinks.options import FilesystemOptions

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_CHUNK = 256 * 1024  # as webhook.ci.fetch.CHUNK: one per delivery in flight
PARTIAL_DIR = ".partial"  # in the sink's directory: files being written, renamed out when complete


class FilesystemSink(Sink):
    """Writes each event's audio files, then its metadata, atomically into ``root``.

    A consumer can rely on this: once ``<job_id>.event.json`` exists, every file it lists is
    complete, and all of them survive a power cut. Files are written in the hidden subdirectory
    ``.partial`` and renamed into place, so globbing ``*.event.json`` never sees them half-written.
    Files are created with mode 0600 (only the service's user can read them).

    The audio is a hard link to the worker's staged download when both are on one filesystem (no
    second copy of the bytes; it keeps the download's mode, 0600, and modification time), else a copy.
    """

    def __init__(self, root: Path, name: str = "filesystem") -> None:
        # Not created here: building a sink (as check does) must leave the disk as it was.
        self.name = name
        self.root = root

    @classmethod
    def from_options(cls, name: str, options: FilesystemOptions, context: BuildContext) -> FilesystemSink:
        return cls(Path(options.dir), name=name)

    def deliver(self, event: Event) -> None:
        """Write the files; delivering the same event again replaces them with identical ones."""
        job_id = event.job.job_id
        if not _JOB_ID.fullmatch(job_id):
            raise DeliveryError(f"{self.name}: job id {job_id[:64]!r} is not a safe file name", permanent=True)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            root = self.root.resolve()
            names = audio_names("", event)
            # Every file, then the document: if a later file cannot be written, the earlier ones are
            # in place but no document lists them, so a reader of *.event.json sees nothing of the
            # job until the retry writes them all (the same names) and the document after them.
            for file, name in zip(event.files, names, strict=True):
                if (source := file.fetched.path) is not None:
                    self._write(root, name, functools.partial(_link_or_copy, source))
            document = document_bytes(event, names)
            self._write(root, document_name("", event.job), lambda temp: _create(temp, lambda dst: dst.write(document)))
        except OSError as exc:
            raise DeliveryError(
                f"{self.name}: cannot write {exc.filename or self.root}: {exc.strerror or exc}"
            ) from exc

    def location(self, job: Job, presign_seconds: int | None = None, file: JobFile | None = None) -> FileLocation:
        return FileLocation(kind="filesystem", path=str(self.root.resolve() / audio_name("", job, file)))

    def target(self) -> str:
        return str(self.root.absolute())

    def check(self) -> str:
        """Whether deliveries can write here, found out without creating anything.

        A missing directory is fine when the nearest existing ancestor is a directory the
        service may write in: the first delivery creates it.
        """
        root = self.root.absolute()
        # lexists: a dangling symlink is in the way of mkdir as much as a file is.
        nearest = next(path for path in (root, *root.parents) if os.path.lexists(path))
        if nearest == root:
            if not root.is_dir():  # in the words a delivery's mkdir would use
                raise DeliveryError(f"{self.name}: cannot write in {root}: {os.strerror(errno.EEXIST)}")
            if not _writable(root):
                raise DeliveryError(f"{self.name}: cannot write in {root}: {os.strerror(errno.EACCES)}")
            return "writable"
        if not nearest.is_dir():
            raise DeliveryError(f"{self.name}: cannot create {root}: {nearest} is not a directory")
        if not _writable(nearest):
            raise DeliveryError(f"{self.name}: cannot create {root}: {nearest} is not writable")
        return "does not exist yet; the first delivery creates it"

    def _write(self, root: Path, name: str, fill: Callable[[Path], None]) -> None:
        """``fill`` makes a temporary file whose bytes are on disk; it becomes ``name`` by rename."""
        target = root / name
        # The name is already safe; this also refuses a symlink planted at the target that points elsewhere.
        if target.resolve().parent != root:
            raise DeliveryError(f"{self.name}: {name!r} resolves outside {root}", permanent=True)
        # Temporary files live in a directory of their own, which holds only writes under way and
        # those of killed workers: looking for the latter costs the same however many files the
        # sink holds. The retry clears them.
        partial = root / PARTIAL_DIR
        partial.mkdir(mode=0o700, exist_ok=True)
        if partial.resolve() != partial:  # a symlink planted there would take the bytes elsewhere first
            raise DeliveryError(f"{self.name}: {PARTIAL_DIR!r} resolves outside {root}", permanent=True)
        for stale in partial.glob(f"{glob.escape(name)}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        temp = partial / f"{name}.{secrets.token_hex(8)}.tmp"
        try:
            fill(temp)
            os.replace(temp, target)
        finally:
            # Gone after a rename, except when it was a link to the file already at the target:
            # rename() between two names of one file leaves both.
            with contextlib.suppress(OSError):
                os.unlink(temp)
        # Makes the rename itself durable, so the audio's entry is on disk before the JSON's.
        _fsync(root)


def _create(path: Path, fill: Callable[[IO[bytes]], object]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as dst:
        fill(dst)
        dst.flush()
        os.fsync(dst.fileno())


def _link_or_copy(source: str, temp: Path) -> None:
    try:
        os.link(source, temp)
    except OSError:
        # Another filesystem (EXDEV), links refused (EPERM, e.g. fs.protected_hardlinks) or not
        # supported: a copy works, or fails with the reason worth reporting.
        with open(source, "rb") as src:
            _create(temp, lambda dst: shutil.copyfileobj(src, dst, _CHUNK))
        return
    # Staging does not fsync its downloads (most sinks never need that): the first link does.
    _fsync(temp)


def _writable(directory: Path) -> bool:
    # access() asks the kernel without creating a probe file; it also answers no on a read-only mount.
    return os.access(directory, os.W_OK | os.X_OK)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
