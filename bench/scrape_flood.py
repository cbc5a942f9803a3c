"""A flood of ``/metrics`` against the same flood of ``/livez``: what each costs callback ingest.

What it measures: the Procfile's ``web:`` command (its own gunicorn settings, on a fresh SQLite
ledger unless ``--ledger postgresql``) takes callbacks at a fixed rate (``--rate``, open loop,
latency from the scheduled send, as ``bench/ingest.py`` measures it) three times: alone, while
``--flood`` threads send ``GET /livez`` back to back over keep-alive connections, and while they send
``GET /metrics`` the same way. ``/livez`` answers a constant: the least any request costs. The last
lines printed are the ratios of the ``/metrics`` flood to the ``/livez`` flood: the ingest p99 under
each, and the requests per second each flood got through (a request that costs more gets fewer).

Run: ``.venv/bin/python bench/scrape_flood.py`` (``--seconds N``, ``--rate R``, ``--flood T``);
results also land in ``bench/results/scrape_flood.json``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import LEDGERS, POSTGRES_URL, BenchError, ledger_url, write_results
from ingest import FixedRate, callback_template, check_sample, fixed_rate, real_app


@dataclass(frozen=True)
class Flood:
    path: str
    requests: int
    non_200: int
    rps: float


@dataclass(frozen=True)
class Run:
    flood: Flood | None
    ingest: FixedRate


@contextmanager
def flooding(port: int, path: str, threads: int) -> Iterator[list[Flood]]:
    """``threads`` clients sending GET ``path`` back to back until the block ends; the Flood is appended then."""
    stop = threading.Event()
    counts: list[tuple[int, int]] = []
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        done = failed = 0
        while not stop.is_set():
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                failed += response.status != 200
            except (OSError, http.client.HTTPException):
                conn.close()
                failed += 1
            done += 1
        conn.close()
        with lock:
            counts.append((done, failed))

    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    result: list[Flood] = []
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    try:
        yield result
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
        elapsed = time.perf_counter() - started
        total, failed = sum(c[0] for c in counts), sum(c[1] for c in counts)
        result.append(Flood(path, total, failed, total / elapsed))


def measure(args: argparse.Namespace, work: Path) -> list[Run]:
    token = secrets.token_urlsafe(24)
    path = f"/callback/{token}"
    template = callback_template()
    runs = []
    with (
        ledger_url(args.ledger, work, args.postgres_url) as database_url,
        real_app(work, [], database_url, token, "flood") as app,
    ):
        check_sample(app.url + path, template)
        fixed_rate(app.port, path, args.rate, 2, args.connections, template)  # warm-up
        runs.append(Run(None, fixed_rate(app.port, path, args.rate, args.seconds, args.connections, template)))
        for probe in ("/livez", "/metrics"):
            print(f"ingest at {args.rate:g} req/s under a flood of {probe} ...", file=sys.stderr, flush=True)
            with flooding(app.port, probe, args.flood) as flood:
                ingest = fixed_rate(app.port, path, args.rate, args.seconds, args.connections, template)
            runs.append(Run(flood[0], ingest))
    return runs


def report(args: argparse.Namespace, runs: list[Run]) -> None:
    print(
        f"scrape flood: web ({args.ledger}), callbacks at {args.rate:g} req/s for {args.seconds} s, "
        f"{args.flood} flood threads"
    )
    print(f"{'under':<10} {'flood req/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7}")
    for run in runs:
        name = run.flood.path if run.flood else "nothing"
        flood_rps = f"{run.flood.rps:.0f}" if run.flood else "-"
        i = run.ingest
        print(f"{name:<10} {flood_rps:>12} {i.p50_ms:>8.2f} {i.p99_ms:>8.2f} {i.failed:>7}")
    livez, scraped = runs[1], runs[2]
    if livez.flood is None or scraped.flood is None:
        raise BenchError("the flood runs recorded no flood")
    print(f"ingest p99 under /metrics flood: {scraped.ingest.p99_ms / livez.ingest.p99_ms:.2f} x under /livez flood")
    print(f"/metrics flood: {scraped.flood.rps / livez.flood.rps:.2f} x the /livez flood's req/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ledger", choices=LEDGERS, default="sqlite")
    parser.add_argument("--seconds", type=int, default=10, help="each measured run (default: 10)")
    parser.add_argument("--rate", type=float, default=100.0, help="callbacks per second (default: 100)")
    parser.add_argument("--connections", type=int, default=8, help="threads sending callbacks (default: 8)")
    parser.add_argument("--flood", type=int, default=4, help="threads flooding /livez or /metrics (default: 4)")
    parser.add_argument("--postgres-url", default=POSTGRES_URL, help="default: TEST_POSTGRES_URL or the tests' URL")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp:
            runs = measure(args, Path(tmp))
    except BenchError as exc:
        print(f"benchmark FAILED: {exc}", file=sys.stderr)
        return 1
    write_results(
        "scrape_flood",
        {"load_average_before": load_before, "args": vars(args), "runs": [asdict(run) for run in runs]},
    )
    report(args, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
