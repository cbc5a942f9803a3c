"""Delivery: ``cos-webhook worker`` processes against a raw SDK copy of the same objects, and its latency.

What it measures, with the COS/CI sandbox in its own process on 127.0.0.1:

* **Throughput**: ``--jobs`` objects of ``--size-mib`` MiB delivered by ``--workers``
  ``cos-webhook worker`` processes (default settings, filesystem sink): each job verified with
  DescribeMediaJob, its object fetched (length and CRC64 checked) and written to the sink; against
  the same objects copied from the sandbox to disk by as many threads with the bare SDK
  (``get_object`` streamed to a file), once before and once after the workers (the machine's
  speed drifts; the baseline is their mean). Both in MiB/s; the last line printed is the ratio,
  e.g. ``deliver: 0.42 x raw SDK copy (80.1 / 190.3 MiB/s)``.
* **At COS/CI latency** (``--latency MS``, default 50; 0 skips it): ``--latency-jobs`` more jobs
  delivered by one worker process while the sandbox waits that long before answering every
  request (a ``delay`` fault), in jobs/s, with how many COS/CI calls each job took.
* **Idle latency**: with one worker started and idle, ``--idle-jobs`` jobs submitted one at a time
  (after a random pause, so each callback lands at a random point of the worker's poll cycle); for
  each, the time from the callback being stored (the ledger's ``jobs.created_at``) to its
  ``<job_id>.event.json`` appearing in the sink directory (written after the audio, so the
  delivery is complete), polled every 2 ms. These objects are the sandbox's own output of a
  0.2 s recording (about 6 KiB). The p50 is reported.

How: every job is a real sandbox job submitted through the SDK with ``CallBack`` pointing at the
real app (in this process, on the ledger the workers use), as ``tests/support/pipeline.py`` does.
Once all callbacks of a batch are recorded, each job's output object is replaced with random bytes
of the size asked for (the sandbox runs with ``--no-results``: CI reports no MD5 to check them
against, and verification compares keys); the baseline copies those very
objects. A worker batch is timed from the first worker logging ``started`` (so start-up imports
are not counted) until the ledger shows every job ``delivered`` (polled every 20 ms); every
delivered file is then checked against the uploaded object's SHA-256, or nothing is printed. Dirty
pages are written back (``sync``) before each timed step.

Run: ``.venv/bin/python bench/deliver.py`` (``--jobs 300 --size-mib 1 --workers 2 --latency 50``,
``--ledger sqlite|postgresql``; PostgreSQL is ``TEST_POSTGRES_URL``, a private schema dropped afterwards);
results also land in ``bench/results/deliver.json``. Disk use peaks at about three times
jobs x size (sandbox, staging, sink), in one temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC
from pathlib import Path

import requests
import sqlalchemy as sa
from harness import (
    COS_WEBHOOK,
    LEDGERS,
    POSTGRES_URL,
    BenchError,
    Process,
    clean_environ,
    free_port,
    ledger_url,
    percentile,
    positive,
    running,
    start,
    wait_http_ok,
    write_results,
)
from qcloud_cos import CosS3Client

from webhook.ci.client import make_client
from webhook.ci.submit import submit_noise_reduction
from webhook.config import Settings
from webhook.config_values import CosEndpoint
from webhook.dev.sandbox import noisy_wav
from webhook.dev.sandbox.admin import FAULTS_PATH
from webhook.dev.sandbox.server import SANDBOX_APPID, SANDBOX_ID, SANDBOX_KEY
from webhook.ledger import Ledger
from webhook.ledger.schema import jobs
from webhook.models import JobStatus, ObjectLocation
from webhook.web.app import create_app
from webhook.web.server import BackgroundServer

MIB = 1024 * 1024
REGION = "ap-guangzhou"
BUCKET = f"bench-{SANDBOX_APPID}"
INPUT_KEY = "bench/noisy.wav"
INPUT_SECONDS = 0.2
STARTED = b" started sinks="
CALLBACK_TIMEOUT = 120.0
IDLE_TIMEOUT = 30.0
FAILED = {JobStatus.REJECTED, JobStatus.DEAD, JobStatus.IGNORED}


@dataclass(frozen=True)
class Copy:
    """A batch moved from COS to disk: by the SDK alone, or delivered by worker processes."""

    what: str
    objects: int
    mib: float
    seconds: float
    mib_s: float
    jobs_s: float
    calls_per_job: float | None = None  # COS/CI requests per job, when a fault counted them


@dataclass(frozen=True)
class Idle:
    jobs: int
    object_bytes: int
    p50_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float
    latencies_ms: list[float]


@dataclass(frozen=True)
class Rig:
    work: Path
    sandbox_url: str
    client: CosS3Client
    ledger: Ledger
    callback_url: str
    sink_dir: Path
    worker_env: dict[str, str]

    def sdk_client(self) -> CosS3Client:
        port = int(self.sandbox_url.rsplit(":", 1)[1])
        return make_client(SANDBOX_ID, SANDBOX_KEY, REGION, CosEndpoint("http", "127.0.0.1", port))


@contextmanager
def start_rig(work: Path, ledger_kind: str, postgres_url: str) -> Iterator[Rig]:
    """The sandbox (its own process), a fresh ledger, the real app receiving callbacks; the input uploaded."""
    token = secrets.token_urlsafe(24)
    sink_dir = work / "sink"
    staging = work / "staging"
    staging.mkdir()
    with ExitStack() as stack:
        port = free_port()
        sandbox_url = f"http://127.0.0.1:{port}"
        # The outputs are replaced with objects of the size measured: a CI that reported their MD5
        # would (rightly) make every fetch fail its check, so this one reports none.
        command = [str(COS_WEBHOOK), "sandbox", "--host", "127.0.0.1", "--port", str(port), "--no-results"]
        command += ["--root", str(work / "cos")]
        sandbox = stack.enter_context(running("sandbox", command, clean_environ(), work / "sandbox.log"))
        wait_http_ok(sandbox_url + FAULTS_PATH, sandbox)
        database_url = stack.enter_context(ledger_url(ledger_kind, work, postgres_url))
        ledger = Ledger(database_url)
        stack.callback(ledger.dispose)
        settings = Settings(database_url=database_url, callback_tokens=(token,), log_level="WARNING")
        receiver = stack.enter_context(BackgroundServer(create_app(settings, ledger), name="bench-receiver"))
        client = make_client(SANDBOX_ID, SANDBOX_KEY, REGION, CosEndpoint("http", "127.0.0.1", port))
        with noisy_wav(work / "noisy.wav", seconds=INPUT_SECONDS).open("rb") as body:
            client.put_object(Bucket=BUCKET, Body=body, Key=INPUT_KEY)
        # The worker's defaults otherwise (poll interval, retries, leases): what a deploy runs.
        worker_env = clean_environ() | {
            "WEBHOOK_DATABASE_URL": database_url,
            "WEBHOOK_CALLBACK_TOKEN": token,
            "COS_SECRET_ID": SANDBOX_ID,
            "COS_SECRET_KEY": SANDBOX_KEY,
            "COS_REGION": REGION,
            "WEBHOOK_ALLOWED_BUCKETS": BUCKET,
            "WEBHOOK_COS_ENDPOINT": sandbox_url,
            "WEBHOOK_SINK_DIR": str(sink_dir),
            "WEBHOOK_TEMP_DIR": str(staging),
        }
        yield Rig(work, sandbox_url, client, ledger, f"{receiver.url}/callback/{token}", sink_dir, worker_env)


def submit(rig: Rig, output_key: str) -> str:
    return submit_noise_reduction(rig.client, INPUT_KEY, ObjectLocation(BUCKET, REGION, output_key), rig.callback_url)


def statuses(rig: Rig, job_ids: list[str]) -> dict[str, int]:
    """How many of ``job_ids`` the ledger has in each status."""
    query = sa.select(jobs.c.status, sa.func.count()).where(jobs.c.job_id.in_(job_ids)).group_by(jobs.c.status)
    with rig.ledger.engine.connect() as conn:
        return {status: int(n) for status, n in conn.execute(query)}


def submit_batch(rig: Rig, keys: list[str]) -> dict[str, str]:
    """Submit one job per output key; return {job id: key} once every callback is in the ledger."""
    by_job = {submit(rig, key): key for key in keys}
    job_ids = list(by_job)
    deadline = time.monotonic() + CALLBACK_TIMEOUT
    while (received := statuses(rig, job_ids).get(JobStatus.RECEIVED, 0)) < len(job_ids):
        if time.monotonic() > deadline:
            raise BenchError(f"{received} of {len(job_ids)} callbacks reached the ledger within {CALLBACK_TIMEOUT} s")
        time.sleep(0.05)
    return by_job


def per_thread_client(rig: Rig) -> Callable[[], CosS3Client]:
    local = threading.local()

    def client() -> CosS3Client:
        if not hasattr(local, "client"):
            local.client = rig.sdk_client()
        return local.client

    return client


def upload_random(rig: Rig, keys: list[str], size: int) -> dict[str, str]:
    """Replace each key's object with ``size`` random bytes; return {key: SHA-256}."""
    client = per_thread_client(rig)

    def upload(key: str) -> tuple[str, str]:
        data = os.urandom(size)
        client().put_object(Bucket=BUCKET, Body=data, Key=key)
        return key, hashlib.sha256(data).hexdigest()

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(upload, keys))


def sdk_copy(rig: Rig, keys: list[str], size: int, threads: int, digests: dict[str, str], when: str) -> Copy:
    """The baseline: ``threads`` threads of this process download ``keys`` with the SDK to files."""
    target = rig.work / "baseline"
    target.mkdir()
    client = per_thread_client(rig)

    def download(key: str) -> None:
        client().get_object(Bucket=BUCKET, Key=key)["Body"].get_stream_to_file(str(target / key.replace("/", "_")))

    with ThreadPoolExecutor(threads) as pool:
        for _ in range(threads):  # clients built before the clock starts, as a worker's are
            pool.submit(client).result()
        settle_disk()
        started = time.monotonic()
        list(pool.map(download, keys))
        seconds = time.monotonic() - started
    for key in keys:
        path = target / key.replace("/", "_")
        with path.open("rb") as file:
            if hashlib.file_digest(file, "sha256").hexdigest() != digests[key]:
                raise BenchError(f"the SDK's copy of {key} differs from the uploaded object")
        path.unlink()
    target.rmdir()
    mib = len(keys) * size / MIB
    what = f"raw SDK copy, {threads} threads, {when}"
    return Copy(what, len(keys), mib, seconds, mib / seconds, len(keys) / seconds)


def mean_copy(before: Copy, after: Copy) -> Copy:
    what = before.what.rsplit(",", 1)[0] + ", mean"
    return Copy(
        what,
        before.objects,
        before.mib,
        seconds=(before.seconds + after.seconds) / 2,
        mib_s=(before.mib_s + after.mib_s) / 2,
        jobs_s=(before.jobs_s + after.jobs_s) / 2,
    )


def start_workers(rig: Rig, count: int, name: str) -> list[Process]:
    return [
        start(f"worker {name}-{i}", [str(COS_WEBHOOK), "worker"], rig.worker_env, rig.work / f"worker-{name}-{i}.log")
        for i in range(count)
    ]


def first_started(workers: list[Process], timeout: float = 60.0) -> float:
    """When the first of ``workers`` logged that it started (time.monotonic()); waits for all of them."""
    seen: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(workers):
        for i, worker in enumerate(workers):
            if i not in seen and worker.log.exists() and STARTED in worker.log.read_bytes():
                seen[i] = time.monotonic()
            elif not worker.alive():
                raise BenchError(f"{worker.name} exited with {worker.popen.returncode}:\n{worker.log_text()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{len(seen)} of {len(workers)} workers started within {timeout} s")
        time.sleep(0.005)
    return min(seen.values())


def stop_workers(workers: list[Process]) -> None:
    codes = [worker.stop() for worker in workers]
    if any(codes):
        logs = "\n".join(f"{w.name} exited with {c}:\n{w.log_text()}" for w, c in zip(workers, codes, strict=True) if c)
        raise BenchError(logs)


def deliver_batch(
    rig: Rig, by_job: dict[str, str], digests: dict[str, str], size: int, workers: int, name: str
) -> Copy:
    """Run ``workers`` worker processes until every job of ``by_job`` is delivered; check every file."""
    job_ids = list(by_job)
    timeout = 60 + len(job_ids) * size / MIB  # at least 1 MiB/s, whatever the latency asked for
    settle_disk()
    processes = start_workers(rig, workers, name)
    try:
        started = first_started(processes)
        deadline = started + timeout
        while (counts := statuses(rig, job_ids)).get(JobStatus.DELIVERED, 0) < len(job_ids):
            if failed := {s: n for s, n in counts.items() if s in FAILED}:
                raise BenchError(f"jobs ended {failed} instead of delivered; see {rig.work}/worker-{name}-*.log")
            if time.monotonic() > deadline:
                raise BenchError(f"after {timeout:.0f} s only {counts} of {len(job_ids)} jobs")
            if dead := [p for p in processes if not p.alive()]:
                raise BenchError(f"{dead[0].name} exited:\n{dead[0].log_text()}")
            time.sleep(0.02)
        seconds = time.monotonic() - started
    finally:
        stop_workers(processes)
    check_and_clear(rig, by_job, digests)
    mib = len(job_ids) * size / MIB
    what = f"cos-webhook worker, {workers} process{'es' if workers > 1 else ''}"
    return Copy(what, len(job_ids), mib, seconds, mib / seconds, len(job_ids) / seconds)


def check_and_clear(rig: Rig, by_job: dict[str, str], digests: dict[str, str]) -> None:
    """Each job's delivered audio must be the bytes uploaded as its key; then its files go, for the next phase."""
    for job_id, key in by_job.items():
        audio = rig.sink_dir / f"{job_id}.wav"
        with audio.open("rb") as file:
            if hashlib.file_digest(file, "sha256").hexdigest() != digests[key]:
                raise BenchError(f"the filesystem sink's {audio.name} differs from the uploaded {key}")
        audio.unlink()
        (rig.sink_dir / f"{job_id}.event.json").unlink()


def settle_disk() -> None:
    """Write back what earlier steps left dirty in the page cache (hundreds of MiB of uploads), so
    the timed step that follows does not pay for it and the next one does not get it for free."""
    os.sync()


def batch(rig: Rig, prefix: str, count: int, size: int) -> tuple[dict[str, str], dict[str, str]]:
    """Jobs whose callbacks are recorded and whose outputs are random objects: ({job: key}, {key: sha256})."""
    keys = [f"{prefix}/{i:05d}.wav" for i in range(count)]
    by_job = submit_batch(rig, keys)
    return by_job, upload_random(rig, keys, size)


def add_delay(rig: Rig, seconds: float) -> None:
    response = requests.post(rig.sandbox_url + FAULTS_PATH, json={"delay": seconds}, timeout=10)
    response.raise_for_status()


def clear_faults(rig: Rig) -> int:
    """Remove the faults; return how many requests they fired on."""
    fired = sum(f["fired"] for f in requests.get(rig.sandbox_url + FAULTS_PATH, timeout=10).json()["faults"])
    requests.delete(rig.sandbox_url + FAULTS_PATH, timeout=10).raise_for_status()
    return int(fired)


def at_latency(rig: Rig, latency_ms: float, count: int, size: int) -> Copy:
    by_job, digests = batch(rig, "latency", count, size)
    add_delay(rig, latency_ms / 1000)
    try:
        result = deliver_batch(rig, by_job, digests, size, 1, "latency")
    finally:
        calls = clear_faults(rig)
    what = f"cos-webhook worker, 1 process, {latency_ms:g} ms per COS/CI call"
    return Copy(what, result.objects, result.mib, result.seconds, result.mib_s, result.jobs_s, calls / count)


def idle_latency(rig: Rig, count: int, rng: random.Random) -> Idle:
    """One idle worker; jobs one at a time; callback stored -> event file in the sink directory."""
    (worker,) = start_workers(rig, 1, "idle")
    latencies: list[float] = []
    sizes: list[int] = []
    try:
        first_started([worker])
        time.sleep(1.0)  # past its start-up work: idle
        for i in range(count):
            time.sleep(rng.uniform(0.2, 1.2))
            job_id = submit(rig, f"idle/{i:05d}.wav")
            event = rig.sink_dir / f"{job_id}.event.json"
            deadline = time.monotonic() + IDLE_TIMEOUT
            while not event.exists():
                if time.monotonic() > deadline:
                    view = rig.ledger.views.show_job(job_id) if statuses(rig, [job_id]) else None
                    raise BenchError(f"job {job_id} not delivered within {IDLE_TIMEOUT} s: {view}")
                time.sleep(0.002)
            seen = time.time()
            with rig.ledger.engine.connect() as conn:
                created = conn.execute(sa.select(jobs.c.created_at).where(jobs.c.job_id == job_id)).scalar_one()
            latencies.append((seen - created.replace(tzinfo=UTC).timestamp()) * 1000)
            sizes.append((rig.sink_dir / f"{job_id}.wav").stat().st_size)
    finally:
        stop_workers([worker])
    return Idle(
        jobs=count,
        object_bytes=max(sizes),
        p50_ms=percentile(latencies, 50),
        p90_ms=percentile(latencies, 90),
        min_ms=min(latencies),
        max_ms=max(latencies),
        latencies_ms=[round(x, 1) for x in latencies],
    )


def report(
    args: argparse.Namespace, baselines: list[Copy], workers: Copy, latency: Copy | None, idle: Idle | None
) -> None:
    baseline = baselines[-1]
    print(
        f"deliver: {args.jobs} x {args.size_mib} MiB objects from the sandbox on 127.0.0.1, "
        f"{args.ledger} ledger, filesystem sink, "
        + (f"worker concurrency {args.concurrency}" if args.concurrency else "default worker settings")
    )
    print(f"{'':<52} {'MiB/s':>8} {'jobs/s':>8} {'seconds':>8}")
    for copy in (baselines[0], workers, *baselines[1:], latency):
        if copy is not None:
            print(f"{copy.what:<52} {copy.mib_s:>8.1f} {copy.jobs_s:>8.1f} {copy.seconds:>8.2f}")
    if latency is not None and latency.calls_per_job is not None:
        print(f"  at latency: {latency.objects} jobs, {latency.calls_per_job:.1f} COS/CI calls per job")
    if idle is not None:
        print(
            f"idle latency, callback stored -> file in the sink ({idle.jobs} jobs one at a time, "
            f"{idle.object_bytes} B objects): p50 {idle.p50_ms:.0f} ms, p90 {idle.p90_ms:.0f} ms, "
            f"min {idle.min_ms:.0f} ms, max {idle.max_ms:.0f} ms"
        )
    ratio = workers.mib_s / baseline.mib_s
    print(f"deliver: {ratio:.2f} x raw SDK copy ({workers.mib_s:.1f} / {baseline.mib_s:.1f} MiB/s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=positive, default=300, help="default: 300")
    parser.add_argument("--size-mib", type=positive, default=1, help="default: 1")
    parser.add_argument("--workers", type=positive, default=2, help="worker processes and SDK threads (default: 2)")
    parser.add_argument("--latency", type=float, default=50.0, metavar="MS", help="per COS/CI call; 0 skips (50)")
    parser.add_argument("--latency-jobs", type=positive, default=100, help="jobs of the latency run (default: 100)")
    parser.add_argument("--idle-jobs", type=int, default=20, help="jobs of the idle probe; 0 skips (default: 20)")
    parser.add_argument("--ledger", choices=LEDGERS, default="sqlite")
    parser.add_argument("--concurrency", type=positive, help="WEBHOOK_WORKER_CONCURRENCY (default: the worker's)")
    parser.add_argument("--postgres-url", default=POSTGRES_URL, help="default: TEST_POSTGRES_URL or the tests' URL")
    args = parser.parse_args(argv)
    if not COS_WEBHOOK.exists():
        print(f"{COS_WEBHOOK} does not exist: run this with the project's .venv/bin/python", file=sys.stderr)
        return 1
    size = args.size_mib * MIB
    load_before = os.getloadavg()
    latency: Copy | None = None
    idle: Idle | None = None
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-deliver-") as tmp,
            start_rig(Path(tmp), args.ledger, args.postgres_url) as rig,
        ):
            if args.concurrency:
                rig.worker_env["WEBHOOK_WORKER_CONCURRENCY"] = str(args.concurrency)
            print(f"submitting {args.jobs} jobs, uploading their objects ...", file=sys.stderr, flush=True)
            by_job, digests = batch(rig, "throughput", args.jobs, size)
            print(f"baseline, {args.workers} worker processes, baseline again ...", file=sys.stderr, flush=True)
            # The machine's speed drifts (shared cores): the baseline is measured on both sides of the workers.
            before = sdk_copy(rig, list(digests), size, args.workers, digests, "before")
            workers = deliver_batch(rig, by_job, digests, size, args.workers, "throughput")
            after = sdk_copy(rig, list(digests), size, args.workers, digests, "after")
            baseline = mean_copy(before, after)
            if args.latency > 0:
                print(f"1 worker at {args.latency:g} ms per COS/CI call ...", file=sys.stderr, flush=True)
                latency = at_latency(rig, args.latency, args.latency_jobs, size)
            if args.idle_jobs > 0:
                print(f"idle latency, {args.idle_jobs} jobs ...", file=sys.stderr, flush=True)
                idle = idle_latency(rig, args.idle_jobs, random.Random(1))
    except BenchError as exc:
        print(f"benchmark FAILED: {exc}", file=sys.stderr)
        return 1
    write_results(
        "deliver",
        {
            "load_average_before": load_before,
            "jobs": args.jobs,
            "size_mib": args.size_mib,
            "workers": args.workers,
            "ledger": args.ledger,
            "baseline_before": asdict(before),
            "baseline_after": asdict(after),
            "baseline": asdict(baseline),
            "workers_run": asdict(workers),
            "latency_ms": args.latency,
            "latency_run": asdict(latency) if latency else None,
            "idle": asdict(idle) if idle else None,
            "ratio": workers.mib_s / baseline.mib_s,
        },
    )
    report(args, [before, after, baseline], workers, latency, idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
