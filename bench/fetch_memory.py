"""Peak memory of the worker delivering a small and a large object, end to end.

What it measures: the peak resident set size (RSS) and the wall time of one ``cos-webhook worker
--burst`` process that verifies NoiseReduction jobs with the CI API, streams each job's output
object from COS to a staged file and delivers it to the filesystem and http sinks, once per object
size (default 1, 200 and 1024 MiB), with ``--jobs`` jobs of that size (default 1), which it runs at
once up to ``WEBHOOK_WORKER_CONCURRENCY``: the worker has its default settings, 8 for that. Fetching
and delivering stream in chunks, so the peak RSS should not grow with the object; the last line
printed is the difference between the largest and the smallest size, and the exit code is 1 if it is
more than ``--max-growth`` MiB (default 10).

How: everything except the worker runs in this process on 127.0.0.1: the COS/CI sandbox, the
callback receiver (the real app with a SQLite ledger) and an http sink receiver that reads each POST
in chunks, counts it, hashes its base64-decoded file part and discards it. For each size, a job is
submitted through the SDK with its callback pointing at the receiver; once the callback is recorded,
the job's output object is replaced with random bytes of that size, the same for every job of one
size (the sandbox reports no ``MediaResult``, so no MD5 to check them against, and verification
compares keys). Then one worker runs all of that size's jobs as a
separate process, and its peak RSS is ``ru_maxrss`` from ``wait4()``, taken by
``bench/peak_rss.py``, which forks the worker from a small interpreter rather than from this process
(see there why). No numbers are printed, and the exit code is 1, unless every job ends
``delivered``, the filesystem sink's file has the uploaded object's size and SHA-256, and the http
sink received one body per job of more than 4/3 of the size whose file part decodes to the same
SHA-256.

Run: ``make bench``, or ``.venv/bin/python bench/fetch_memory.py --sizes 1 200 1024 --jobs 8``
(sizes in MiB). The results are also written to ``bench/results/fetch_memory.json``. Disk use peaks
at about twice the largest size times ``--jobs`` (the sandbox's objects and the staged downloads,
which the filesystem sink hard-links), all in one temporary directory that is removed at the end;
the benchmark refuses to start without that much free space.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path

from harness import positive
from qcloud_cos import CosS3Client

from webhook.ci.submit import submit_noise_reduction
from webhook.config import Settings
from webhook.dev.sandbox import Sandbox, noisy_wav
from webhook.ledger import Ledger, LedgerError
from webhook.models import JobStatus, ObjectLocation
from webhook.web.app import create_app
from webhook.web.server import BackgroundServer

MIB = 1024 * 1024
REGION = "ap-guangzhou"
BUCKET = "bench-1250000000"
INPUT_KEY = "bench/noisy.wav"
BENCH_DIR = Path(__file__).resolve().parent
RESULTS_PATH = BENCH_DIR / "results" / "fetch_memory.json"
PEAK_RSS = BENCH_DIR / "peak_rss.py"
WORKER = Path(sys.executable).with_name("cos-webhook")  # the console script beside the venv's python
CALLBACK_TIMEOUT = 60.0
WORKER_TIMEOUT = 120.0  # plus the bytes' time at WORKER_MIN_RATE
WORKER_MIN_RATE = 5 * MIB


class BenchError(Exception):
    """The benchmark could not measure what it claims to measure."""


@dataclass(frozen=True)
class Result:
    size_mib: int
    jobs: int
    peak_rss_mib: float
    wall_seconds: float
    throughput_mib_s: float  # size * jobs / the worker's whole wall time, start-up included


@dataclass(frozen=True)
class SinkPost:
    """What the http sink receiver kept of one POST."""

    size: int
    file_sha256: str | None  # of the base64-decoded file part; None if the body has none


class FilePartDigest:
    """SHA-256 of the base64-decoded ``file`` part of a multipart body fed in chunks of any size."""

    def __init__(self, boundary: str) -> None:
        self._start = f'--{boundary}\r\nContent-Disposition: form-data; name="file"'.encode()
        self._end = f"\r\n--{boundary}--\r\n".encode()
        self._buffer = bytearray()
        self._in_file = False
        self._sha256 = hashlib.sha256()

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        if not self._in_file:
            start = self._buffer.find(self._start)
            headers_end = self._buffer.find(b"\r\n\r\n", start) if start >= 0 else -1
            if headers_end < 0:
                return  # the part before the file is small: keep it until the file part begins
            del self._buffer[: headers_end + 4]
            self._in_file = True
        # Hold back what may be the closing delimiter; decode whole 4-character groups before it.
        ready = max(0, len(self._buffer) - len(self._end))
        ready -= ready % 4
        self._sha256.update(base64.b64decode(self._buffer[:ready], validate=True))
        del self._buffer[:ready]

    def finish(self) -> str | None:
        """The digest once the whole body was fed; None if it had no complete file part."""
        if not self._in_file or not self._buffer.endswith(self._end):
            return None
        self._sha256.update(base64.b64decode(self._buffer[: -len(self._end)], validate=True))
        return self._sha256.hexdigest()


class SinkReceiver(ThreadingHTTPServer):
    """Answers every POST 200 after reading its body in chunks; keeps only a :class:`SinkPost`."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SinkHandler)
        self.posts: list[SinkPost] = []


class _SinkHandler(BaseHTTPRequestHandler):
    server: SinkReceiver

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        file_part = FilePartDigest(self.headers.get_boundary() or "")
        remaining = length
        while remaining and (chunk := self.rfile.read(min(MIB, remaining))):
            file_part.feed(chunk)
            remaining -= len(chunk)
        self.server.posts.append(SinkPost(length - remaining, file_part.finish()))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Keep the access log out of the benchmark's output."""


@dataclass(frozen=True)
class Rig:
    """What runs in this process, and the environment that points a worker process at it."""

    work: Path
    client: CosS3Client
    ledger: Ledger
    callback_url: str
    sink: SinkReceiver
    sink_dir: Path
    worker_env: dict[str, str]


@contextmanager
def serving(server: HTTPServer) -> Iterator[str]:
    """Serve in a background thread; yield the base URL.

    For the http sink receiver: a plain ``http.server``, which ``webhook.web.server.BackgroundServer``
    (for WSGI apps) cannot run.
    """
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def start_rig(work: Path) -> Iterator[Rig]:
    """Start the sandbox, the callback receiver and the http sink receiver; upload the input WAV."""
    token = secrets.token_urlsafe(24)
    database_url = f"sqlite:///{work / 'ledger.db'}"
    sink_dir = work / "sink"
    with ExitStack() as stack:
        sandbox = Sandbox(work / "sandbox").start()
        # Outputs are replaced with objects of the size measured: a reported MD5 would fail them.
        sandbox.reports_results = False
        stack.callback(sandbox.stop)
        ledger = Ledger(database_url)
        ledger.migrate()
        stack.callback(ledger.dispose)
        app = create_app(Settings(database_url=database_url, callback_tokens=(token,), log_level="WARNING"), ledger)
        receiver_url = stack.enter_context(BackgroundServer(app, name="bench-receiver")).url
        sink = SinkReceiver()
        sink_url = stack.enter_context(serving(sink))

        client = sandbox.client(REGION)
        with noisy_wav(work / "noisy.wav", seconds=1.0).open("rb") as body:
            client.put_object(Bucket=BUCKET, Body=body, Key=INPUT_KEY)
        # Only this benchmark's settings: none of the caller's WEBHOOK_* or COS_* variables.
        worker_env = {k: v for k, v in os.environ.items() if not k.startswith(("WEBHOOK_", "COS_"))}
        worker_env |= {
            "WEBHOOK_DATABASE_URL": database_url,
            "WEBHOOK_CALLBACK_TOKEN": token,
            "COS_SECRET_ID": sandbox.secret_id,
            "COS_SECRET_KEY": sandbox.secret_key,
            "COS_REGION": REGION,
            "WEBHOOK_ALLOWED_BUCKETS": BUCKET,
            "WEBHOOK_COS_ENDPOINT": sandbox.url,
            "WEBHOOK_SINK_DIR": str(sink_dir),
            "WEBHOOK_HTTP_SINK_URL": f"{sink_url}/events",
            # The audio pushed through the http sink too, not only a link to it: both paths stream it.
            "WEBHOOK_HTTP_SINK_MODE": "multipart",
            "WEBHOOK_HTTP_SINK_SECRET": "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
            "WEBHOOK_TEMP_DIR": str(work),
        }
        yield Rig(work, client, ledger, f"{receiver_url}/callback/{token}", sink, sink_dir, worker_env)


def measure(rig: Rig, size_mib: int, jobs: int) -> Result:
    """Submit ``jobs`` jobs with output objects of ``size_mib`` MiB, run a worker; check what it delivered."""
    size = size_mib * MIB
    output_keys = [f"bench/denoised-{size_mib}mib-{n}.wav" for n in range(jobs)]
    job_ids = [submit_job(rig, key) for key in output_keys]
    sha256 = upload_random_objects(rig, output_keys, size)
    rig.sink.posts.clear()
    peak_rss_bytes, wall_seconds = run_worker(rig, WORKER_TIMEOUT + size * jobs / WORKER_MIN_RATE)

    for job_id in job_ids:
        view = rig.ledger.views.show_job(job_id)
        if view.status != JobStatus.DELIVERED:
            errors = "; ".join(f"{task.kind} {task.sink}: {task.last_error}" for task in view.tasks if task.last_error)
            raise BenchError(f"job {job_id} is {view.status}, not delivered: {view.reason or errors}")
        delivered = rig.sink_dir / f"{job_id}.wav"
        with delivered.open("rb") as file:
            delivered_sha256 = hashlib.file_digest(file, "sha256").hexdigest()
        if delivered.stat().st_size != size or delivered_sha256 != sha256:
            raise BenchError(f"the filesystem sink's {delivered.name} differs from the uploaded object")
    if len(rig.sink.posts) != jobs:
        raise BenchError(f"the http sink received {len(rig.sink.posts)} POSTs, not {jobs}")
    for post in rig.sink.posts:
        if post.size <= size * 4 / 3 or post.file_sha256 != sha256:
            raise BenchError(
                f"the http sink received {post.size} bytes whose file part differs from the uploaded object"
            )

    for job_id in job_ids:
        (rig.sink_dir / f"{job_id}.wav").unlink()
        (rig.sink_dir / f"{job_id}.event.json").unlink()
    for key in output_keys:
        rig.client.delete_object(Bucket=BUCKET, Key=key)
    return Result(size_mib, jobs, peak_rss_bytes / MIB, wall_seconds, size_mib * jobs / wall_seconds)


def submit_job(rig: Rig, output_key: str) -> str:
    """Submit a NoiseReduction job through the SDK; return its id once its callback is in the ledger."""
    job_id = submit_noise_reduction(rig.client, INPUT_KEY, ObjectLocation(BUCKET, REGION, output_key), rig.callback_url)
    deadline = time.monotonic() + CALLBACK_TIMEOUT
    while time.monotonic() < deadline:
        try:
            status = rig.ledger.views.show_job(job_id).status
        except LedgerError:
            time.sleep(0.05)  # the callback has not arrived yet
            continue
        if status != JobStatus.RECEIVED:
            raise BenchError(f"job {job_id} is {status} after its callback, not {JobStatus.RECEIVED}")
        return job_id
    raise BenchError(f"the callback of job {job_id} did not reach the ledger within {CALLBACK_TIMEOUT:.0f} s")


def upload_random_objects(rig: Rig, keys: list[str], size: int) -> str:
    """Put the same ``size`` random bytes, streamed from disk, at each of ``keys``; return their SHA-256."""
    source = rig.work / "object.bin"
    sha256 = hashlib.sha256()
    with source.open("wb") as out:
        for offset in range(0, size, MIB):
            chunk = os.urandom(min(MIB, size - offset))
            sha256.update(chunk)
            out.write(chunk)
    for key in keys:
        with source.open("rb") as body:
            rig.client.put_object(Bucket=BUCKET, Body=body, Key=key)
    source.unlink()
    return sha256.hexdigest()


def run_worker(rig: Rig, timeout: float) -> tuple[int, float]:
    """Run ``cos-webhook worker --burst`` under ``peak_rss.py``; return its peak RSS (bytes) and wall time (s)."""
    result_path = rig.work / "peak_rss.json"
    log_path = rig.work / "worker.log"
    command = [sys.executable, str(PEAK_RSS), str(result_path), str(WORKER), "worker", "--burst"]
    with log_path.open("wb") as log:
        # Its own session, so that a timeout or Ctrl+C here can stop the worker along with the launcher.
        launcher = subprocess.Popen(
            command, env=rig.worker_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            launcher.wait(timeout=timeout)
        finally:
            if launcher.returncode is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
    worker_log = log_path.read_text(errors="replace").strip()
    if launcher.returncode != 0:
        raise BenchError(f"peak_rss.py exited with {launcher.returncode}:\n{worker_log}")
    run = json.loads(result_path.read_text())
    if run["exit_code"] != 0:
        raise BenchError(f"the worker exited with {run['exit_code']}:\n{worker_log}")
    return run["peak_rss_bytes"], run["wall_seconds"]


def report(results: list[Result]) -> float:
    """Print the table; return the peak RSS of the largest size minus that of the smallest, in MiB."""
    print(f"{'size MiB':>8}  {'jobs':>4}  {'peak RSS MiB':>12}  {'wall s':>7}  {'MiB/s':>7}")
    for r in results:
        print(
            f"{r.size_mib:>8}  {r.jobs:>4}  {r.peak_rss_mib:>12.1f}  {r.wall_seconds:>7.2f}  {r.throughput_mib_s:>7.1f}"
        )
    smallest = min(results, key=lambda r: r.size_mib)
    largest = max(results, key=lambda r: r.size_mib)
    difference = largest.peak_rss_mib - smallest.peak_rss_mib
    print(f"peak RSS at {largest.size_mib} MiB minus at {smallest.size_mib} MiB: {difference:+.1f} MiB")
    return difference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=positive, nargs="+", default=[1, 200, 1024], metavar="MIB", help="default: 1 200 1024"
    )
    parser.add_argument("--jobs", type=positive, default=1, metavar="N", help="jobs of each size at once; default: 1")
    parser.add_argument(
        "--max-growth", type=float, default=10.0, metavar="MIB", help="the most peak RSS may grow; default: 10"
    )
    args = parser.parse_args(argv)
    if not WORKER.exists():
        print(f"{WORKER} does not exist: run this with the project's .venv/bin/python", file=sys.stderr)
        return 1
    concurrency = Settings.model_fields["worker_concurrency"].default
    results: list[Result] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-fetch-memory-") as tmp:
            needed = 2 * max(args.sizes) * MIB * args.jobs + 256 * MIB  # objects and staged files, and some room
            if (free := shutil.disk_usage(tmp).free) < needed:
                raise BenchError(f"{tmp} has {free // MIB} MiB free; this run needs {needed // MIB} MiB")
            with start_rig(Path(tmp)) as rig:
                for size_mib in args.sizes:
                    print(f"delivering {args.jobs} job(s) of {size_mib} MiB ...", file=sys.stderr, flush=True)
                    results.append(measure(rig, size_mib, args.jobs))
    except (BenchError, subprocess.TimeoutExpired) as exc:
        print(f"benchmark FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"worker concurrency: {concurrency} (the default)")
    difference = report(results)
    RESULTS_PATH.parent.mkdir(exist_ok=True)
    document = {
        "benchmark": "fetch_memory",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "worker_concurrency": concurrency,
        "results": [asdict(r) for r in results],
        "peak_rss_difference_mib": difference,
        "max_growth_mib": args.max_growth,
    }
    RESULTS_PATH.write_text(json.dumps(document, indent=2) + "\n")
    if difference > args.max_growth:
        print(f"peak RSS grew by more than {args.max_growth:g} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
