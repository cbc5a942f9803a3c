"""Bulkheads: the filesystem sink's throughput while an http sink hangs, against a healthy http sink.

What it measures, in one run, with the COS/CI sandbox in its own process on 127.0.0.1 (the rig of
``deliver.py``): ``--workers`` ``cos-webhook worker`` processes (default settings: 8 verifications
and 4 deliveries per sink in flight each) deliver ``--jobs`` jobs to two sinks, a directory and an
http receiver in this process, three times:

1. **healthy**: the receiver answers every POST ``200`` at once;
2. **hanging**: the receiver accepts each connection, reads the request and never answers (the
   http sink's deadline is the default 30 s, longer than the whole phase);
3. **healthy** again (the machine's speed drifts: the baseline is the mean of 1 and 3).

Each phase is timed from the first worker logging ``started`` until every job of the phase has its
filesystem delivery ``done`` in the ledger (polled every 20 ms), and reports the filesystem sink's
throughput in jobs/s; every file delivered is checked against the uploaded object's SHA-256. Each
phase declares its http sink under a name of its own (``WEBHOOK_CONFIG``), so the next phase's
workers never pick up the hung deliveries of the one before. The last line printed is the ratio of
phase 2 to the baseline, e.g. ``bulkhead: 0.97 x (hanging http sink 61.0 / healthy 62.9 jobs/s)``;
the goal is at least 0.9.

Run: ``.venv/bin/python bench/bulkhead.py`` (``--jobs 200 --size-mib 1 --workers 2``,
``--ledger sqlite|postgresql``); results also land in ``bench/results/bulkhead.json``.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import sqlalchemy as sa
from deliver import MIB, Rig, batch, check_and_clear, first_started, settle_disk, start_rig, start_workers, stop_workers
from harness import COS_WEBHOOK, LEDGERS, POSTGRES_URL, BenchError, positive, write_results

from webhook.ledger.schema import tasks
from webhook.models import TaskKind, TaskStatus

HTTP_SECRET = "whsec_" + base64.b64encode(b"b" * 32).decode()
FILESYSTEM = "filesystem"  # the sink WEBHOOK_SINK_DIR declares


@dataclass(frozen=True)
class Phase:
    what: str
    jobs: int
    seconds: float
    jobs_s: float
    http_requests: int  # POSTs the http receiver saw during the phase


class HttpSink(ThreadingHTTPServer):
    """The http sink's far end: answers 200 at once, or (``hang``) reads each request and never answers."""

    daemon_threads = True

    def __init__(self, hang: bool) -> None:
        self.hang = hang
        self.requests = 0
        self.released = threading.Event()  # set on close: the hung handlers return
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/hooks"
        threading.Thread(target=self.serve_forever, name="bench-http-sink", daemon=True).start()

    def close(self) -> None:
        self.released.set()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: HttpSink

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests += 1
        if self.server.hang:
            self.server.released.wait()
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass  # thousands of lines that say nothing the counts do not


def filesystem_done(rig: Rig, job_ids: list[str]) -> int:
    query = (
        sa.select(sa.func.count())
        .select_from(tasks)
        .where(
            tasks.c.job_id.in_(job_ids),
            tasks.c.kind == TaskKind.DELIVER,
            tasks.c.sink == FILESYSTEM,
            tasks.c.status == TaskStatus.DONE,
        )
    )
    with rig.ledger.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def phase(rig: Rig, name: str, hang: bool, jobs: int, size: int, workers: int) -> Phase:
    """Jobs delivered to the directory and to an http sink named ``name`` (hanging or not), timed."""
    by_job, digests = batch(rig, name, jobs, size)
    job_ids = list(by_job)
    config = rig.work / f"{name}.toml"
    with HttpSink(hang) as sink:
        config.write_text(
            f'[[sinks]]\nname = "{name}"\ntype = "http"\n'
            f'options = {{ url = "{sink.url}", secret_env = "BENCH_HTTP_SECRET" }}\n'
        )
        env = rig.worker_env | {"WEBHOOK_CONFIG": str(config), "BENCH_HTTP_SECRET": HTTP_SECRET}
        settle_disk()
        processes = start_workers(replace(rig, worker_env=env), workers, name)
        try:
            started = first_started(processes)
            deadline = started + 60 + jobs * size / MIB
            while (done := filesystem_done(rig, job_ids)) < len(job_ids):
                if time.monotonic() > deadline:
                    raise BenchError(f"{name}: {done} of {len(job_ids)} filesystem deliveries; see {rig.work}")
                if dead := [p for p in processes if not p.alive()]:
                    raise BenchError(f"{dead[0].name} exited:\n{dead[0].log_text()}")
                time.sleep(0.02)
            seconds = time.monotonic() - started
            requests = sink.requests
        finally:
            sink.close()  # a hung delivery fails now, and the workers can stop
            stop_workers(processes)
    check_and_clear(rig, by_job, digests)
    what = f"{'hanging' if hang else 'healthy'} http sink ({name})"
    return Phase(what, len(job_ids), seconds, len(job_ids) / seconds, requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=positive, default=200, help="per phase (default: 200)")
    parser.add_argument("--size-mib", type=positive, default=1, help="default: 1")
    parser.add_argument("--workers", type=positive, default=2, help="worker processes (default: 2)")
    parser.add_argument("--ledger", choices=LEDGERS, default="sqlite")
    parser.add_argument("--postgres-url", default=POSTGRES_URL, help="default: TEST_POSTGRES_URL or the tests' URL")
    args = parser.parse_args(argv)
    if not COS_WEBHOOK.exists():
        print(f"{COS_WEBHOOK} does not exist: run this with the project's .venv/bin/python", file=sys.stderr)
        return 1
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the receiver's line per callback
    size = args.size_mib * MIB
    load_before = os.getloadavg()
    phases: list[Phase] = []
    try:
        with (
            tempfile.TemporaryDirectory(prefix="bench-bulkhead-") as tmp,
            start_rig(Path(tmp), args.ledger, args.postgres_url) as rig,
        ):
            for name, hang in (("healthy-1", False), ("hanging", True), ("healthy-2", False)):
                print(f"{name}: {args.jobs} jobs, {args.workers} workers ...", file=sys.stderr, flush=True)
                phases.append(phase(rig, name, hang, args.jobs, size, args.workers))
    except BenchError as exc:
        print(f"benchmark FAILED: {exc}", file=sys.stderr)
        return 1
    healthy = (phases[0].jobs_s + phases[2].jobs_s) / 2
    hanging = phases[1].jobs_s
    ratio = hanging / healthy
    write_results(
        "bulkhead",
        {
            "load_average_before": load_before,
            "jobs": args.jobs,
            "size_mib": args.size_mib,
            "workers": args.workers,
            "ledger": args.ledger,
            "phases": [asdict(p) for p in phases],
            "healthy_jobs_s": healthy,
            "ratio": ratio,
        },
    )
    print(f"bulkhead: {args.jobs} x {args.size_mib} MiB jobs per phase, {args.ledger} ledger, default worker settings")
    print(f"{'filesystem sink, with a':<36} {'jobs/s':>8} {'seconds':>8} {'http POSTs':>10}")
    for p in phases:
        print(f"{p.what:<36} {p.jobs_s:>8.1f} {p.seconds:>8.2f} {p.http_requests:>10}")
    print(f"bulkhead: {ratio:.2f} x (hanging http sink {hanging:.1f} / healthy {healthy:.1f} jobs/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
