"""FilesystemSink: names, bytes, atomicity leftovers, idempotency and confinement to its root."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.services import unavailable
from support.sink_dir import written
from support.waiting import wait_for

from webhook.dev.sandbox import Sandbox
from webhook.models import Event, FetchedFile, Job, JobFile, ObjectLocation
from webhook.sinks import BuildContext, DeliveryError, Sink
from webhook.sinks.events import build_event, event_document
from webhook.sinks.filesystem import PARTIAL_DIR, FilesystemSink
from webhook.sinks.options import FilesystemOptions
from webhook.worker.staging import Staging

AUDIO = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and a bit: more than one copy chunk
BUCKET, REGION = "audio-1250000000", "ap-guangzhou"


def make_event(tmp_path: Path, job_id: str = "job-1", key: str = "out/a.wav", content: bytes = AUDIO) -> Event:
    """A succeeded job's event, its audio staged as the worker stages it: a new file renamed into place.

    Never rewritten in place: the sink may have hard-linked the previous file.
    """
    source = tmp_path / "fetched" / "download.staged"
    source.parent.mkdir(exist_ok=True)
    part = source.with_suffix(".part")
    part.write_bytes(content)
    part.replace(source)
    job = Job(job_id=job_id, tag="NoiseReduction", state="Success", output=ObjectLocation("b-1250000000", "r", key))
    fetched = FetchedFile(path=str(source), size=len(content), crc64="1", content_type="audio/wav")
    assert job.output is not None
    return Event(event_id="evt_test", type="job.succeeded", job=job, files=(JobFile(job.output, fetched),))


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (following no symlinks) and its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file() and not p.is_symlink()}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "sink" / "out"  # missing on purpose: the sink creates it


def listing(path: Path) -> list[str]:
    """Every entry under ``path``, directories and dangling symlinks included."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def verdict(sink: FilesystemSink) -> str:
    try:
        return "ok    " + sink.check()
    except DeliveryError as exc:
        return "FAIL  " + exc.message


def test_writes_audio_and_metadata(tmp_path: Path, root: Path) -> None:
    event = make_event(tmp_path)
    sink: Sink = FilesystemSink(root)
    sink.deliver(event)
    assert written(root) == ["job-1.event.json", "job-1.wav"]  # and no temporary files left behind
    assert (root / "job-1.wav").read_bytes() == AUDIO
    assert json.loads((root / "job-1.event.json").read_text()) == event_document(event, ["job-1.wav"])


def test_redelivery_leaves_one_copy_of_each(tmp_path: Path, root: Path) -> None:
    sink = FilesystemSink(root)
    sink.deliver(make_event(tmp_path, content=b"first"))
    sink.deliver(make_event(tmp_path))
    sink.deliver(make_event(tmp_path))
    assert written(root) == ["job-1.event.json", "job-1.wav"]
    assert (root / "job-1.wav").read_bytes() == AUDIO


def test_failed_job_writes_only_metadata(root: Path) -> None:
    job = Job(job_id="job-2", tag="NoiseReduction", state="Failed", code="InvalidInput", message="bad audio")
    event = Event(event_id="evt_failed", type="job.failed", job=job)
    FilesystemSink(root).deliver(event)
    assert written(root) == ["job-2.event.json"]
    assert json.loads((root / "job-2.event.json").read_text())["job"]["message"] == "bad audio"


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("out/a.wav", "job-1.wav"),
        ("a.MP3", "job-1.MP3"),
        ("x/y.tar.gz", "job-1.gz"),
        ("noext", "job-1.bin"),
        ("out/.wav", "job-1.bin"),
        ("out/dir/", "job-1.bin"),
        ("a.toolong123", "job-1.bin"),
        ("a.w@v", "job-1.bin"),
        ("a.\u0661\u0662", "job-1.bin"),  # Arabic-Indic digits are not ASCII alphanumerics
        ("../../../etc/passwd", "job-1.bin"),
        ("a.wav/../../../x.sh", "job-1.sh"),
        ("a\x00.wav", "job-1.wav"),
    ],
)
def test_extension_comes_from_the_key_sanitized(tmp_path: Path, root: Path, key: str, name: str) -> None:
    FilesystemSink(root).deliver(make_event(tmp_path, key=key))
    assert written(root) == sorted([name, "job-1.event.json"])


@pytest.mark.parametrize(
    ("key", "audio"),
    [
        ("out/denoised.json", "job-1.json"),
        ("out/denoised.JSON", "job-1.JSON"),
        ("out/denoised.event", "job-1.event"),
        ("out/denoised.event.json", "job-1.json"),
    ],
)
def test_audio_named_like_metadata_is_kept_apart_from_it(tmp_path: Path, root: Path, key: str, audio: str) -> None:
    event = make_event(tmp_path, key=key)
    sink = FilesystemSink(root)
    sink.deliver(event)
    assert written(root) == sorted([audio, "job-1.event.json"])
    assert (root / audio).read_bytes() == AUDIO
    assert json.loads((root / "job-1.event.json").read_text()) == event_document(event, [audio])
    assert sink.location(event.job).path == str(root.resolve() / audio)


@pytest.mark.parametrize(
    "job_id",
    ["../x", "/etc/passwd", "a\x00b", "x" * 300, "ünïcode", "", ".", "..", "a/b", "a\\b", "a b", "job\n"],
)
def test_hostile_job_ids_write_nothing_anywhere(tmp_path: Path, root: Path, job_id: str) -> None:
    event = make_event(tmp_path, job_id=job_id, key="../../../../../" + job_id)
    before = tree(tmp_path)
    with pytest.raises(DeliveryError) as caught:
        FilesystemSink(root).deliver(event)
    assert caught.value.permanent
    assert tree(tmp_path) == before


@pytest.mark.parametrize("key", ["../../x.wav", "/etc/passwd", "a\x00b", "k" * 300 + ".wav", "ü/ñ.wav", "..", "/"])
def test_hostile_keys_land_inside_root(tmp_path: Path, root: Path, key: str) -> None:
    event = make_event(tmp_path, key=key)
    before = tree(tmp_path)
    FilesystemSink(root).deliver(event)
    new_files = tree(tmp_path).keys() - before.keys()
    assert len(new_files) == 2
    assert all((tmp_path / name).parent == root for name in new_files)


def test_refuses_a_symlink_planted_at_the_target(tmp_path: Path, root: Path) -> None:
    outside = tmp_path / "outside.wav"
    outside.write_bytes(b"precious")
    root.mkdir(parents=True)
    (root / "job-1.wav").symlink_to(outside)
    with pytest.raises(DeliveryError, match="outside") as caught:
        FilesystemSink(root).deliver(make_event(tmp_path))
    assert caught.value.permanent
    assert outside.read_bytes() == b"precious"


def test_refuses_a_symlink_planted_as_its_partial_directory(tmp_path: Path, root: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root.mkdir(parents=True)
    (root / ".partial").symlink_to(elsewhere)
    with pytest.raises(DeliveryError, match=r"'\.partial' resolves outside") as caught:
        FilesystemSink(root).deliver(make_event(tmp_path))
    assert caught.value.permanent
    assert os.listdir(elsewhere) == []
    assert sorted(os.listdir(root)) == [".partial"]


def test_missing_source_file_is_retryable_and_leaves_no_metadata(tmp_path: Path, root: Path) -> None:
    event = make_event(tmp_path)
    assert event.file is not None
    os.unlink(event.file.path)
    with pytest.raises(DeliveryError) as caught:
        FilesystemSink(root).deliver(event)
    assert not caught.value.permanent
    assert written(root) == []


def two_files(tmp_path: Path) -> Event:
    """Job ``job-1``'s event for the two files CI wrote, ``out/a-1.wav`` and ``out/a-2.mp3``, staged."""
    files = []
    for number, (key, content) in enumerate((("out/a-1.wav", AUDIO), ("out/a-2.mp3", b"part two")), start=1):
        staged = tmp_path / "fetched" / f"job-1.{number}.staged"
        staged.parent.mkdir(exist_ok=True)
        staged.write_bytes(content)
        fetched = FetchedFile(path=str(staged), size=len(content), crc64="1", content_type="audio/wav")
        files.append(JobFile(ObjectLocation("b-1250000000", "r", key), fetched, number, 2))
    job = Job(job_id="job-1", tag="NoiseReduction", state="Success", output=files[0].source)
    return build_event(job, "filesystem", files)


def test_each_file_is_written_under_its_number_then_the_document_naming_them(tmp_path: Path, root: Path) -> None:
    event = two_files(tmp_path)
    sink = FilesystemSink(root)

    sink.deliver(event)

    assert written(root) == ["job-1.1.wav", "job-1.2.mp3", "job-1.event.json"]
    assert [(root / name).read_bytes() for name in ("job-1.1.wav", "job-1.2.mp3")] == [AUDIO, b"part two"]
    document = json.loads((root / "job-1.event.json").read_text())
    assert document == event_document(event, ["job-1.1.wav", "job-1.2.mp3"])
    assert [sink.location(event.job, file=file).path for file in event.files] == [
        str(root.resolve() / "job-1.1.wav"),
        str(root.resolve() / "job-1.2.mp3"),
    ]


def test_a_later_file_that_cannot_be_written_leaves_no_document_until_the_retry(tmp_path: Path, root: Path) -> None:
    event = two_files(tmp_path)
    second = Path(str(event.files[1].fetched.path))
    second.rename(second.with_suffix(".aside"))
    sink = FilesystemSink(root)

    with pytest.raises(DeliveryError) as caught:
        sink.deliver(event)

    # The first file is in place, but no document lists it: a reader of *.event.json sees nothing yet.
    assert not caught.value.permanent
    assert written(root) == ["job-1.1.wav"]
    second.with_suffix(".aside").rename(second)
    sink.deliver(event)
    assert written(root) == ["job-1.1.wav", "job-1.2.mp3", "job-1.event.json"]


def test_temporary_file_left_by_a_killed_worker_is_cleared_on_retry(tmp_path: Path) -> None:
    root = tmp_path / "out"
    (root / ".partial").mkdir(parents=True)
    leftover = root / ".partial" / "job-1.wav.abc123.tmp"
    leftover.write_bytes(b"half an upload")
    other = root / ".partial" / "job-2.wav.def456.tmp"  # another job's write, perhaps under way
    other.write_bytes(b"another upload")
    source = tmp_path / "a.wav"
    source.write_bytes(b"RIFF complete")
    job = Job(job_id="job-1", tag="NoiseReduction", state="Success", output=ObjectLocation("b-1", "r", "o/a.wav"))
    fetched = FetchedFile(path=str(source), size=13, crc64="0", content_type="audio/wav")

    FilesystemSink(root).deliver(build_event(job, "filesystem", fetched))

    assert sorted(p.name for p in root.iterdir()) == [".partial", "job-1.event.json", "job-1.wav"]
    assert [p.name for p in (root / ".partial").iterdir()] == [other.name]


@pytest.mark.slow  # 200 deliveries of 1 MiB, each fsynced
def test_a_reader_never_sees_a_final_name_before_its_file_is_complete(tmp_path: Path, root: Path) -> None:
    """What the docstring promises readers: a final name holds a whole file, and once
    ``<job_id>.event.json`` exists the audio beside it is complete."""
    sink = FilesystemSink(root)
    root.mkdir(parents=True)
    done = threading.Event()
    seen: list[tuple[str, int]] = []
    wrong: list[str] = []

    def read_along() -> None:
        while not done.is_set():
            for entry in os.scandir(root):
                if entry.name.startswith("."):
                    continue  # temporary files: not promised to anyone
                try:
                    data = Path(entry.path).read_bytes()
                except FileNotFoundError:
                    continue
                if entry.name.endswith(".event.json"):
                    audio = root / entry.name.replace(".event.json", ".wav")
                    if json.loads(data)["file"]["size"] != len(audio.read_bytes()):
                        wrong.append(f"{entry.name} before its audio was whole")
                elif data != AUDIO:
                    wrong.append(f"{entry.name} with {len(data)} of {len(AUDIO)} bytes")
                seen.append((entry.name, len(data)))

    reader = threading.Thread(target=read_along)
    reader.start()
    try:
        for n in range(200):
            sink.deliver(make_event(tmp_path, job_id=f"job-{n}"))
    finally:
        done.set()
        reader.join()
    assert wrong == []
    assert len({name for name, _ in seen}) > 50  # the reader really read along, not only at the end


def test_building_and_checking_create_nothing_and_the_first_delivery_creates_the_directory(
    tmp_path: Path, root: Path
) -> None:
    before = listing(tmp_path)
    sink = FilesystemSink.from_options("archive", FilesystemOptions(dir=str(root)), BuildContext({}))

    assert verdict(sink) == "ok    does not exist yet; the first delivery creates it"
    assert listing(tmp_path) == before

    sink.deliver(make_event(tmp_path))
    assert written(root) == ["job-1.event.json", "job-1.wav"]


def test_checking_a_writable_directory_leaves_no_probe_behind(root: Path) -> None:
    root.mkdir(parents=True)
    assert verdict(FilesystemSink(root)) == "ok    writable"
    assert os.listdir(root) == []


@pytest.mark.parametrize("obstacle", ["file at the directory", "file at a parent", "dangling symlink at a parent"])
def test_a_directory_that_cannot_be_created_fails_the_check_and_stays_as_it_was(tmp_path: Path, obstacle: str) -> None:
    blocked = tmp_path / "blocked"
    if obstacle == "dangling symlink at a parent":
        blocked.symlink_to(tmp_path / "gone")
    else:
        blocked.write_bytes(b"")
    root = blocked if obstacle == "file at the directory" else blocked / "sink" / "out"
    before = listing(tmp_path)

    message = verdict(FilesystemSink(root, name="archive"))

    if obstacle == "file at the directory":
        assert message == f"FAIL  archive: cannot write in {root}: File exists"
    else:
        assert message == f"FAIL  archive: cannot create {root}: {blocked} is not a directory"
    assert listing(tmp_path) == before


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory that an unprivileged user can reach (pytest's own are private to their owner)."""
    path = Path(tempfile.mkdtemp(prefix="fs-sink-"))
    path.chmod(0o755)
    yield path
    for directory in (path, *path.rglob("*")):
        if directory.is_dir() and not directory.is_symlink():
            directory.chmod(0o755)
    shutil.rmtree(path)


def verdict_without_root(sink: FilesystemSink) -> str:
    """``sink.check()`` as an unprivileged user: root may write in any directory, whatever its mode."""
    if os.geteuid() != 0:
        return verdict(sink)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root for good, answer through the pipe, and leave without cleanup
        status = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)  # nobody
            os.write(write, verdict(sink).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        said = answer.read().decode()
    assert os.waitpid(pid, 0)[1] == 0
    return said


@pytest.mark.parametrize("where", ["missing directory", "existing directory"])
def test_a_directory_the_service_may_not_write_in_fails_the_check(shared_tmp: Path, where: str) -> None:
    locked = shared_tmp / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)  # whatever the umask made of it
    root = locked / "out" if where == "missing directory" else locked
    before = listing(shared_tmp)

    message = verdict_without_root(FilesystemSink(root, name="archive"))

    if where == "missing directory":
        assert message == f"FAIL  archive: cannot create {root}: {locked} is not writable"
    else:
        assert message == f"FAIL  archive: cannot write in {root}: Permission denied"
    assert listing(shared_tmp) == before


def staged_event(sandbox: Sandbox, staging: Staging, key: str, content: bytes) -> tuple[Event, Path]:
    """Job ``job-1``'s event with its output fetched into ``staging`` as the worker does, and the staged file."""
    client = sandbox.client(REGION)
    client.put_object(Bucket=BUCKET, Body=content, Key=key)
    where = ObjectLocation(BUCKET, REGION, key)
    job = Job(job_id="job-1", tag="NoiseReduction", state="Success", output=where)
    fetched = staging.fetch(client, "job-1", where)
    assert fetched.path is not None
    return build_event(job, "filesystem", fetched), Path(fetched.path)


def test_a_staged_download_is_hard_linked_into_place(sandbox: Sandbox, tmp_path: Path, root: Path) -> None:
    staging = Staging(str(tmp_path), 10 * len(AUDIO), "0123abcd")
    event, staged_path = staged_event(sandbox, staging, "out/a.wav", AUDIO)
    sink = FilesystemSink(root)

    sink.deliver(event)
    sink.deliver(event)  # again from the same file: the temporary link and the target are one file

    delivered, staged = (root / "job-1.wav").stat(), staged_path.stat()
    assert (delivered.st_dev, delivered.st_ino) == (staged.st_dev, staged.st_ino)
    assert delivered.st_nlink == 2
    assert stat.S_IMODE(delivered.st_mode) == 0o600
    assert written(root) == ["job-1.event.json", "job-1.wav"]
    assert (root / "job-1.wav").read_bytes() == AUDIO

    # A later attempt staging another object replaces the staged file by rename, never in place.
    staged_event(sandbox, staging, "out/b.wav", b"another object")
    assert (root / "job-1.wav").stat().st_nlink == 1
    staging.release("job-1")
    assert (root / "job-1.wav").read_bytes() == AUDIO


@pytest.fixture
def other_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A directory on another filesystem than ``tmp_path``: in /dev/shm, a tmpfs."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK | os.X_OK)):
        unavailable("no writable /dev/shm: no second filesystem to stage on, so a hard link cannot be made to fail")
    if shm.stat().st_dev == tmp_path.stat().st_dev:
        unavailable("/dev/shm is on the filesystem of pytest's tmp_path: a hard link would not fail")
    path = Path(tempfile.mkdtemp(dir=shm, prefix="fs-sink-"))
    yield path
    shutil.rmtree(path)


def test_a_download_staged_on_another_filesystem_is_copied(
    sandbox: Sandbox, other_filesystem: Path, root: Path
) -> None:
    staging = Staging(str(other_filesystem), 10 * len(AUDIO), "0123abcd")
    event, staged_path = staged_event(sandbox, staging, "out/a.wav", AUDIO)

    FilesystemSink(root).deliver(event)

    delivered, staged = (root / "job-1.wav").stat(), staged_path.stat()
    assert delivered.st_dev != staged.st_dev  # os.link failed with EXDEV
    assert (delivered.st_nlink, staged.st_nlink) == (1, 1)
    assert stat.S_IMODE(delivered.st_mode) == 0o600
    assert written(root) == ["job-1.event.json", "job-1.wav"]
    assert (root / "job-1.wav").read_bytes() == AUDIO
    staging.release("job-1")
    assert (root / "job-1.wav").read_bytes() == AUDIO


def open_for_writing(fifo: Path, reader: threading.Thread) -> int:
    """The FIFO's write end, once ``reader`` has opened it for reading (fails should it end first)."""
    fd: list[int] = []

    def opened() -> bool:
        assert reader.is_alive(), "the delivery ended before it read the staged file"
        try:
            fd.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: no reader yet
            return False
        return True

    wait_for(opened, "the sink to open the staged file")
    os.set_blocking(fd[0], True)
    return fd[0]


def test_a_copy_under_way_is_never_seen_under_its_final_name(other_filesystem: Path, root: Path) -> None:
    """The copy path keeps the promise the hard link keeps by nature: the final name appears only
    once the file is whole. The staged file is a FIFO on another filesystem, so the link fails
    (EXDEV) and the copy waits on the test's writes, half of them first."""
    fifo = other_filesystem / "download.staged"
    os.mkfifo(fifo)
    job = Job(job_id="job-1", tag="NoiseReduction", state="Success", output=ObjectLocation(BUCKET, REGION, "o/a.wav"))
    fetched = FetchedFile(path=str(fifo), size=len(AUDIO), crc64="1", content_type="audio/wav")
    event = build_event(job, "filesystem", fetched)
    failures: list[BaseException] = []

    def deliver() -> None:
        try:
            FilesystemSink(root).deliver(event)
        except BaseException as exc:
            failures.append(exc)

    delivering = threading.Thread(target=deliver)
    delivering.start()
    half = len(AUDIO) // 2  # two copy chunks: the sink has written one at least when the write returns
    try:
        with os.fdopen(open_for_writing(fifo, delivering), "wb") as feed:
            feed.write(AUDIO[:half])
            feed.flush()
            wait_for(
                lambda: any(p.stat().st_size > 0 for p in root.rglob("*") if p.is_file()),
                "the sink to write some of the copy",
            )
            assert [p.name for p in root.iterdir()] == [PARTIAL_DIR]
            feed.write(AUDIO[half:])
    finally:
        delivering.join(timeout=30)
    assert failures == []
    assert written(root) == ["job-1.event.json", "job-1.wav"]
    assert (root / "job-1.wav").read_bytes() == AUDIO
