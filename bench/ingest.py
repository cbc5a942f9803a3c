"""Callback ingest: the real web process against a bare Flask app, same gunicorn flags, same load.

What it measures: how many callbacks per second the Procfile's ``web:`` command (gunicorn and the
real app: authenticate, parse, triage, commit the raw request and its job to the ledger, then
answer 200) acknowledges, against the ceiling of a bare Flask app under gunicorn with the same
flags (``bench/bare_flask.py``: reads the body and answers 200), on SQLite and on PostgreSQL. The
last lines printed are the ratios, e.g. ``ingest sqlite: 0.13 x bare flask (581 / 4640 req/s)``.

How: both apps run as separate gunicorn processes on 127.0.0.1 with ``--gunicorn-flags`` (default
``-w 2 -k sync --threads 1``) appended to their commands, the real one after ``cos-webhook migrate``
on a fresh ledger (a SQLite file, or a private PostgreSQL schema dropped afterwards). ``--threads 1``
is needed because ``gunicorn.conf.py`` sets 4 threads, and gunicorn silently runs ``gthread``
instead of ``sync`` when threads > 1; the worker class each arbiter logs must be the same for
both apps, or the benchmark stops. ``wrk`` (``-t2 -c8`` by default; installed with apt-get when
missing and this runs as root) sends XML callbacks shaped exactly like the sandbox's
(``webhook.dev.sandbox.jobs``), each with a new JobId, to the real token URL: a 2 s warm-up, then
``--seconds`` measured. The machine's speed drifts (its cores are shared), so each ledger's run is
bracketed by two runs of the bare app, and the ceiling is their mean. One request is checked
first: the real app must answer 200 with one new, not duplicate, job, or the benchmark stops.
Afterwards the ledger must hold one job per 200 answer (plus at most the requests in flight when
each wrk run stopped).

Then the acknowledgement latency at half the saturating rate: wrk cannot hold a fixed rate and
wrk2 is not packaged in Debian, so an open-loop generator in this process sends at a fixed rate
from 8 threads over keep-alive connections (gunicorn's sync workers close each one after its
answer, so each request reconnects, as under wrk). Each latency runs from the request's
*scheduled* send time, so a stalled server is not hidden by requests that were sent late (no
coordinated omission). The bare app is driven at the same rate too: its p99 is the floor that this
generator and gunicorn put under any figure.

Run: ``.venv/bin/python bench/ingest.py`` (``--ledger sqlite|postgresql|both``, ``--seconds N``);
results also land in ``bench/results/ingest.json``. PostgreSQL is ``TEST_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``), as for the tests.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa
import xmltodict
from harness import (
    BENCH_DIR,
    GUNICORN,
    LEDGERS,
    POSTGRES_URL,
    BenchError,
    Process,
    clean_environ,
    free_port,
    ledger_url,
    percentile,
    procfile,
    running,
    shell_command,
    wait_http_ok,
    write_results,
)

from webhook.dev.sandbox.jobs import MediaJob
from webhook.models import JobState

WARM_UP_SECONDS = 2
# gunicorn.conf.py asks for 4 threads, and gunicorn quietly runs gthread instead of sync when threads > 1.
DEFAULT_FLAGS = "-w 2 -k sync --threads 1"
PLACEHOLDER = "JOBIDPLACEHOLDER"
CONTENT_TYPE = "application/xml"
WRK_MARKER = "BENCH_RESULT "


@dataclass(frozen=True)
class Load:
    """What wrk measured in one run."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int  # connect, read, write errors and timeouts


@dataclass(frozen=True)
class FixedRate:
    """What the open-loop generator measured at ``rate`` requests per second."""

    rate: float
    seconds: float
    sent: int
    ok: int
    failed: int
    achieved_rps: float
    p50_ms: float  # from each request's scheduled send time to its answer
    p99_ms: float
    max_ms: float
    p99_service_ms: float  # from the actual send, for comparison


@dataclass(frozen=True)
class LedgerRun:
    ledger: str
    bare_before: Load
    saturating: Load
    bare_after: Load
    half_rate: FixedRate
    bare_at_half_rate: FixedRate
    worker_class: str
    jobs_in_ledger: int
    answered_200: int

    @property
    def bare_rps(self) -> float:
        """The ceiling: the bare app's rate in the runs just before and just after this ledger's."""
        return (self.bare_before.rps + self.bare_after.rps) / 2

    @property
    def ratio(self) -> float:
        return self.saturating.rps / self.bare_rps


def callback_template() -> tuple[str, str]:
    """An XML callback as the sandbox sends it, split around where its JobId goes."""
    job = MediaJob(
        job_id=PLACEHOLDER,
        bucket="bench-1250000000",
        region="ap-guangzhou",
        input_key="in/noisy.wav",
        format="wav",
        sample_rate="16000",
        output_bucket="bench-1250000000",
        output_region="ap-guangzhou",
        output_key="out/denoised.wav",
        user_data="ingest benchmark",
        job_level="0",
        callback_url="",
        callback_format="xml",
        queue_id="p" + "0" * 32,
        creation_time="2026-11-30T10:00:00+0800",
        state=JobState.SUCCESS,
        message="",
        start_time="2026-11-30T10:00:01+0800",
        end_time="2026-11-30T10:00:02+0800",
    )
    body: str = xmltodict.unparse({"Response": {"EventName": "TaskFinish", "JobsDetail": job.detail()}})
    prefix, found, suffix = body.partition(PLACEHOLDER)
    if not found or PLACEHOLDER in suffix:
        raise BenchError("the callback template must name its JobId exactly once")
    return prefix, suffix


def new_job_id() -> str:
    return "j" + uuid.uuid4().hex


def body_for(job_id: str, template: tuple[str, str]) -> bytes:
    return f"{template[0]}{job_id}{template[1]}".encode()


WRK_SCRIPT = """\
-- Each request a new JobId: run id (argument), wrk thread, counter.
local prefix = [==[%(prefix)s]==]
local suffix = [==[%(suffix)s]==]
local thread_count = 0
local counter = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_number", thread_count)
end

function init(args)
  run_id = args[1]
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "%(content_type)s"
end

function request()
  counter = counter + 1
  local job_id = string.format("j%%s%%02d%%014d", run_id, thread_number, counter)
  return wrk.format(nil, nil, nil, prefix .. job_id .. suffix)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(marker)s{"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, "status": %%d, ' ..
    '"connect": %%d, "read": %%d, "write": %%d, "timeout": %%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), e.status,
    e.connect, e.read, e.write, e.timeout))
end
"""


def write_wrk_script(path: Path, template: tuple[str, str]) -> None:
    prefix, suffix = template
    if "]==]" in prefix + suffix:
        raise BenchError("the callback template cannot be a Lua long string")
    values = {"prefix": prefix, "suffix": suffix, "content_type": CONTENT_TYPE, "marker": WRK_MARKER}
    path.write_text(WRK_SCRIPT % values)


def ensure_wrk() -> str:
    """wrk's path; installed from the system packages when missing and allowed (root)."""
    if path := shutil.which("wrk"):
        return path
    if os.geteuid() != 0:
        raise BenchError("wrk is not installed and this is not root: install it (apt-get install wrk)")
    print("installing wrk with apt-get ...", file=sys.stderr, flush=True)
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(install, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False)
        done = subprocess.run(install, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BenchError(f"apt-get install wrk failed:\n{done.stdout}{done.stderr}")
    if path := shutil.which("wrk"):
        return path
    raise BenchError("apt-get installed wrk but it is not on PATH")


def run_wrk(wrk: str, script: Path, url: str, seconds: int, threads: int, connections: int) -> Load:
    run_id = secrets.token_hex(8)  # JobIds stay new across runs against the same ledger
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(script)]
    done = subprocess.run(
        [*command, url, "--", run_id], capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith(WRK_MARKER)), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    r: dict[str, int] = json.loads(line.removeprefix(WRK_MARKER))
    duration = r["duration_us"] / 1e6
    return Load(
        requests=r["requests"],
        seconds=duration,
        rps=r["requests"] / duration,
        p50_ms=r["p50_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        non_2xx=r["status"],
        socket_errors=r["connect"] + r["read"] + r["write"] + r["timeout"],
    )


def fixed_rate(
    port: int, path: str, rate: float, seconds: float, connections: int, template: tuple[str, str]
) -> FixedRate:
    """Send ``rate`` requests per second for ``seconds`` from ``connections`` threads, open loop."""
    total = max(1, int(rate * seconds))
    tickets = itertools.count()  # next() on it is atomic under the GIL: each request is sent once
    results: list[tuple[float, float, bool]] = []
    lock = threading.Lock()
    headers = {"Content-Type": CONTENT_TYPE}
    start = time.perf_counter() + 0.2  # every thread is ready before the first scheduled send

    def sender() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine: list[tuple[float, float, bool]] = []
        while (i := next(tickets)) < total:
            scheduled = start + i / rate
            if (wait := scheduled - time.perf_counter()) > 0:
                time.sleep(wait)
            body = body_for(new_job_id(), template)
            sent = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()  # reconnects on the next request
                ok = False
            answered = time.perf_counter()
            mine.append((answered - scheduled, answered - sent, ok))
        conn.close()
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 60)
    elapsed = time.perf_counter() - start
    latencies = [r[0] * 1000 for r in results]
    ok = sum(1 for r in results if r[2])
    return FixedRate(
        rate=rate,
        seconds=seconds,
        sent=len(results),
        ok=ok,
        failed=len(results) - ok,
        achieved_rps=len(results) / elapsed,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        max_ms=max(latencies, default=float("nan")),
        p99_service_ms=percentile([r[1] * 1000 for r in results], 99),
    )


@dataclass(frozen=True)
class Served:
    process: Process
    port: int
    worker_class: str  # as gunicorn's arbiter logged it: the one it runs, whatever the flags said

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def bare_flask(work: Path, flags: list[str]) -> Iterator[Served]:
    port = free_port()
    command = [str(GUNICORN), *flags, *private(work, port), "bare_flask:app"]
    with running("bare flask", command, clean_environ(), work / "bare.log", cwd=BENCH_DIR) as process:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", process)
        yield Served(process, port, worker_class(process))


@contextmanager
def real_app(work: Path, flags: list[str], database_url: str, token: str, name: str) -> Iterator[Served]:
    """The Procfile's web command, bound to loopback, with ``flags`` after its own."""
    port = free_port()
    env = clean_environ() | {"PORT": str(port), "WEBHOOK_DATABASE_URL": database_url, "WEBHOOK_CALLBACK_TOKEN": token}
    command = shell_command(procfile("web"), [*flags, *private(work, port)])
    with running(f"web ({name})", command, env, work / f"web-{name}.log") as process:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", process)
        yield Served(process, port, worker_class(process))


def private(work: Path, port: int) -> list[str]:
    """Loopback only, and a control socket of its own rather than the one every gunicorn of this user shares."""
    return ["--bind", f"127.0.0.1:{port}", "--control-socket", str(work / f"gunicorn-{port}.ctl")]


def worker_class(process: Process) -> str:
    found = re.search(r"Using worker: (\S+)", process.log_text(tail=100_000))
    if found is None:
        raise BenchError(f"{process.name} did not log its worker class:\n{process.log_text()}")
    return found.group(1)


def check_sample(url: str, template: tuple[str, str]) -> None:
    """One callback must be answered 200 with one new job, or nothing measured means anything."""
    job_id = new_job_id()
    response = requests.post(url, data=body_for(job_id, template), headers={"Content-Type": CONTENT_TYPE}, timeout=10)
    expected = {"event": "TaskFinish", "jobs": [{"job_id": job_id, "duplicate": False}], "duplicate": False}
    answer: Any = response.json() if response.headers.get("Content-Type", "").startswith("application/json") else None
    if (
        response.status_code != 200
        or not isinstance(answer, dict)
        or any(answer.get(k) != v for k, v in expected.items())
        or answer.get("ignored")
    ):
        raise BenchError(
            f"a sample callback was answered {response.status_code} {response.text.strip()!r}, "
            "not 200 with one new job: the benchmark's body no longer fits the endpoint"
        )


def check_sample_bare(url: str, template: tuple[str, str]) -> None:
    response = requests.post(
        url, data=body_for(new_job_id(), template), headers={"Content-Type": CONTENT_TYPE}, timeout=10
    )
    if response.status_code != 200:
        raise BenchError(f"the bare Flask app answered {response.status_code}, not 200")


def count_jobs(database_url: str) -> int:
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one())
    finally:
        engine.dispose()


def measure_ledger(
    kind: str,
    args: argparse.Namespace,
    work: Path,
    wrk: str,
    script: Path,
    bare: Served,
    bare_url: str,
    template: tuple[str, str],
) -> LedgerRun:
    token = secrets.token_urlsafe(24)
    path = f"/callback/{token}"
    flags = shlex.split(args.gunicorn_flags)
    with (
        ledger_url(kind, work, args.postgres_url) as database_url,
        real_app(work, flags, database_url, token, kind) as app,
    ):
        if app.worker_class != bare.worker_class:
            raise BenchError(
                f"gunicorn runs {app.worker_class} workers for the web process but {bare.worker_class} for the "
                f"bare app with the same flags ({args.gunicorn_flags}): gunicorn.conf.py decides something the "
                "flags do not override (threads > 1 turns sync into gthread)"
            )
        check_sample(app.url + path, template)
        print(f"{kind}: warm-up, then wrk on bare flask, web, bare flask ...", file=sys.stderr, flush=True)
        warm = run_wrk(wrk, script, app.url + path, WARM_UP_SECONDS, args.threads, args.connections)
        # The machine's speed drifts (shared cores): the ceiling is measured on both sides of the app.
        bare_before = run_wrk(wrk, script, bare_url, args.seconds, args.threads, args.connections)
        load = run_wrk(wrk, script, app.url + path, args.seconds, args.threads, args.connections)
        bare_after = run_wrk(wrk, script, bare_url, args.seconds, args.threads, args.connections)
        rate = load.rps / 2
        print(f"{kind}: {rate:.0f} req/s fixed rate for {args.seconds} s ...", file=sys.stderr, flush=True)
        half = fixed_rate(app.port, path, rate, args.seconds, args.connections, template)
        bare_half = fixed_rate(bare.port, path, rate, args.seconds, args.connections, template)
        answered = 1 + (warm.requests - warm.non_2xx) + (load.requests - load.non_2xx) + half.ok
        jobs = count_jobs(database_url)
    # wrk stops with requests in flight: the app commits them, wrk does not count their answers.
    if not answered <= jobs <= answered + 2 * args.connections:
        print(f"warning: {kind}: {answered} callbacks answered 200 but the ledger has {jobs} jobs", file=sys.stderr)
    return LedgerRun(kind, bare_before, load, bare_after, half, bare_half, app.worker_class, jobs, answered)


def report(args: argparse.Namespace, runs: list[LedgerRun]) -> None:
    classes = ",".join(sorted({r.worker_class for r in runs}))
    print(
        f"ingest: gunicorn {args.gunicorn_flags} ({classes} workers); "
        f"wrk -t{args.threads} -c{args.connections} -d{args.seconds}s; XML callback, new JobId per request"
    )
    print(f"{'app':<18} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'sock err':>8}")
    rows = [
        (name, load)
        for r in runs
        for name, load in (
            ("bare flask", r.bare_before),
            (f"web, {r.ledger}", r.saturating),
            ("bare flask", r.bare_after),
        )
    ]
    for name, load in rows:
        print(
            f"{name:<18} {load.rps:>8.0f} {load.p50_ms:>8.2f} {load.p99_ms:>8.2f} "
            f"{load.non_2xx:>8} {load.socket_errors:>8}"
        )
    print(
        f"at half the saturating rate (fixed-rate Python generator, {args.connections} threads; "
        "latency from the scheduled send):"
    )
    for r in runs:
        h, b = r.half_rate, r.bare_at_half_rate
        print(
            f"  web, {r.ledger} @ {h.rate:.0f} req/s: p50 {h.p50_ms:.2f} ms, p99 {h.p99_ms:.2f} ms, "
            f"max {h.max_ms:.1f} ms, {h.failed} failed; bare flask at that rate: p99 {b.p99_ms:.2f} ms"
        )
    for r in runs:
        cut_off = r.jobs_in_ledger - r.answered_200
        print(
            f"  ledger {r.ledger}: {r.jobs_in_ledger} jobs for {r.answered_200} answers 200"
            + (f" and {cut_off} requests in flight when wrk stopped" if 0 <= cut_off <= 2 * args.connections else "")
            + ("" if 0 <= cut_off <= 2 * args.connections else "  <- MISMATCH")
        )
    for r in runs:
        print(f"ingest {r.ledger}: {r.ratio:.2f} x bare flask ({r.saturating.rps:.0f} / {r.bare_rps:.0f} req/s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ledger", choices=[*LEDGERS, "both"], default="both")
    parser.add_argument("--seconds", type=int, default=10, help="each measured run (default: 10)")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t (default: 2)")
    parser.add_argument("--connections", type=int, default=8, help="wrk -c, and the fixed-rate threads (default: 8)")
    parser.add_argument("--gunicorn-flags", default=DEFAULT_FLAGS, help=f"for both apps (default: '{DEFAULT_FLAGS}')")
    parser.add_argument("--postgres-url", default=POSTGRES_URL, help="default: TEST_POSTGRES_URL or the tests' URL")
    args = parser.parse_args(argv)
    kinds = list(LEDGERS) if args.ledger == "both" else [args.ledger]
    load_before = os.getloadavg()
    try:
        wrk = ensure_wrk()
        template = callback_template()
        with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp, ExitStack() as stack:
            work = Path(tmp)
            script = work / "callback.lua"
            write_wrk_script(script, template)
            bare = stack.enter_context(bare_flask(work, shlex.split(args.gunicorn_flags)))
            bare_url = f"{bare.url}/callback/{secrets.token_urlsafe(24)}"
            check_sample_bare(bare_url, template)
            run_wrk(wrk, script, bare_url, WARM_UP_SECONDS, args.threads, args.connections)
            runs = []
            for kind in kinds:
                ledger_work = work / kind
                ledger_work.mkdir()
                runs.append(measure_ledger(kind, args, ledger_work, wrk, script, bare, bare_url, template))
    except (BenchError, subprocess.TimeoutExpired) as exc:
        print(f"benchmark FAILED: {exc}", file=sys.stderr)
        return 1
    write_results(
        "ingest",
        {
            "load_average_before": load_before,
            "gunicorn_flags": args.gunicorn_flags,
            "wrk": {"threads": args.threads, "connections": args.connections, "seconds": args.seconds},
            "half_rate_generator": "fixed-rate Python threads (wrk2 is not packaged)",
            "ledgers": [asdict(r) | {"bare_rps": r.bare_rps, "ratio": r.ratio} for r in runs],
        },
    )
    report(args, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
