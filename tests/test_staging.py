"""Staged downloads against the sandbox with the real SDK: fetched once, whole, within a budget, from many threads."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from webhook.dev.sandbox import Fault, Sandbox
from webhook.models import ObjectLocation
from webhook.worker.staging import Staging

BUCKET, REGION = "audio-1250000000", "ap-guangzhou"
MIB = 1024 * 1024


def put(sandbox: Sandbox, key: str, size: int) -> ObjectLocation:
    sandbox.client(REGION).put_object(Bucket=BUCKET, Body=os.urandom(size), Key=key)
    return ObjectLocation(BUCKET, REGION, key)


def test_a_staged_object_is_reused_without_asking_cos_again(sandbox: Sandbox, tmp_path: Path) -> None:
    where = put(sandbox, "out/a.wav", MIB)
    gets = sandbox.faults.add(Fault(kind="object GET", path="/out/*", delay=0.001))  # counts GETs
    staging = Staging(str(tmp_path), 10 * MIB, "0123abcd")

    first = staging.fetch(sandbox.client(REGION), "job-a", where)
    again = staging.fetch(sandbox.client(REGION), "job-a", where)

    assert gets.fired == 1
    assert again == first
    assert first.path is not None
    assert Path(first.path).read_bytes() == sandbox.object_path(BUCKET, "out/a.wav").read_bytes()
    staging.release("job-a")
    assert list(staging.directory.iterdir()) == []


def test_a_download_staged_by_another_worker_process_of_the_host_is_reused(sandbox: Sandbox, tmp_path: Path) -> None:
    where = put(sandbox, "out/a.wav", MIB)
    gets = sandbox.faults.add(Fault(kind="object GET", path="/out/*", delay=0.001))  # counts GETs

    def other_worker() -> None:  # its own process, its own tag, the same WEBHOOK_TEMP_DIR
        Staging(str(tmp_path), 10 * MIB, "fedc4321").fetch(sandbox.client(REGION), "job-a", where)

    process = multiprocessing.get_context("fork").Process(target=other_worker)
    process.start()
    process.join(timeout=60)
    assert process.exitcode == 0
    assert gets.fired == 1

    here = Staging(str(tmp_path), 10 * MIB, "0123abcd").fetch(sandbox.client(REGION), "job-a", where)

    assert gets.fired == 1  # not fetched again
    assert here.path is not None
    assert Path(here.path).read_bytes() == sandbox.object_path(BUCKET, "out/a.wav").read_bytes()


def test_each_file_of_a_job_is_staged_under_its_number_and_released_with_the_job(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    first, second = put(sandbox, "out/a-1.wav", 1000), put(sandbox, "out/a-2.wav", 2000)
    staging = Staging(str(tmp_path), 10 * MIB, "0123abcd")
    client = sandbox.client(REGION)

    fetched = [staging.fetch(client, "job-a", where, number=n) for n, where in enumerate((first, second), start=1)]
    staging.fetch(client, "job-b", put(sandbox, "out/b.wav", 500))

    assert [f.size for f in fetched] == [1000, 2000]
    assert staging.staged("job-a", second, number=2) == fetched[1]
    assert staging.staged("job-a", second, number=1) is None  # file 1 of the job is another object
    staging.release("job-a")
    assert sorted(path.name for path in staging.directory.iterdir()) == ["job-b.1.json", "job-b.1.staged"]


def test_a_job_in_use_keeps_all_its_files_through_an_eviction(sandbox: Sandbox, tmp_path: Path) -> None:
    staging = Staging(str(tmp_path), int(1.5 * MIB), "0123abcd")
    client = sandbox.client(REGION)
    parts = [put(sandbox, f"out/a-{n}.wav", MIB // 2) for n in (1, 2)]
    for n, where in enumerate(parts, start=1):
        staging.fetch(client, "job-a", where, number=n)

    def another_thread_fetches() -> None:
        staging.fetch(client, "job-b", put(sandbox, "out/b.wav", MIB))  # over budget: someone must go

    run_threads(1, lambda _: another_thread_fetches())

    assert [staging.staged("job-a", where, number=n) is not None for n, where in enumerate(parts, start=1)] == [
        True,
        True,
    ]


def test_a_staged_download_of_another_object_is_not_reused(sandbox: Sandbox, tmp_path: Path) -> None:
    staging = Staging(str(tmp_path), 10 * MIB, "0123abcd")
    staging.fetch(sandbox.client(REGION), "job-a", put(sandbox, "out/a.wav", 1000))
    other = put(sandbox, "out/b.wav", 2000)
    assert staging.staged("job-a", other) is None
    assert staging.fetch(sandbox.client(REGION), "job-a", other).size == 2000


def test_the_oldest_staged_downloads_are_evicted_beyond_the_budget(sandbox: Sandbox, tmp_path: Path) -> None:
    staging = Staging(str(tmp_path), int(2.5 * MIB), "0123abcd")
    places = {name: put(sandbox, f"out/{name}.wav", MIB) for name in ("a", "b", "c")}
    for name, where in places.items():
        staging.fetch(sandbox.client(REGION), f"job-{name}", where)
    assert staging.staged("job-a", places["a"]) is None
    assert staging.staged("job-b", places["b"]) is not None
    assert staging.staged("job-c", places["c"]) is not None


def test_a_truncated_stage_is_not_trusted(sandbox: Sandbox, tmp_path: Path) -> None:
    where = put(sandbox, "out/a.wav", 4096)
    staging = Staging(str(tmp_path), 10 * MIB, "0123abcd")
    fetched = staging.fetch(sandbox.client(REGION), "job-a", where)
    assert fetched.path is not None
    with open(fetched.path, "r+b") as data:
        data.truncate(100)
    assert staging.staged("job-a", where) is None


def test_sweep_removes_partial_downloads_of_workers_that_are_gone(tmp_path: Path) -> None:
    staging = Staging(str(tmp_path), MIB, "0123abcd")
    staging.directory.mkdir(parents=True)
    mine, dead = staging.directory / "cos-webhook-0123abcd-x.part", staging.directory / "cos-webhook-deadbeef-y.part"
    untagged_old, untagged_new = staging.directory / "cos-webhook-old.part", staging.directory / "cos-webhook-new.part"
    for path in (mine, dead, untagged_old, untagged_new):
        path.write_bytes(b"partial")
    os.utime(untagged_old, (0, 0))

    assert staging.sweep({"0123abcd"}) == 2
    assert sorted(p.name for p in staging.directory.iterdir()) == [mine.name, untagged_new.name]


def staged_files(staging: Staging) -> dict[str, int]:
    """Each staged download's job name and size (each job's one file), checking that nothing else is
    left in the directory."""
    names = sorted(path.name for path in staging.directory.iterdir())
    data = {path.name.removesuffix(".1.staged"): path.stat().st_size for path in staging.directory.glob("*.staged")}
    assert names == sorted([f"{job}.1.staged" for job in data] + [f"{job}.1.json" for job in data])
    return data


def run_threads(count: int, work: Callable[[int], None]) -> None:
    """``work(n)`` in ``count`` threads at once; raises a failure, one that broke a barrier first."""
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(work, n) for n in range(count)]
    if failures := [exc for future in futures if (exc := future.exception()) is not None]:
        raise min(failures, key=lambda exc: isinstance(exc, threading.BrokenBarrierError))


def test_no_thread_loses_its_download_to_another_threads_eviction(sandbox: Sandbox, tmp_path: Path) -> None:
    """Six jobs of 1 MiB fetched at once within a budget of 2.5 MiB: each stays until its thread is done with it."""
    threads = 6
    places = [put(sandbox, f"out/{n}.wav", MIB) for n in range(threads)]
    staging = Staging(str(tmp_path), int(2.5 * MIB), "0123abcd")
    client = sandbox.client(REGION)
    all_fetched = threading.Barrier(threads)
    all_read = threading.Barrier(threads)

    def fetch_then_deliver(n: int) -> None:
        try:
            fetched = staging.fetch(client, f"job-{n}", places[n])
            all_fetched.wait()  # every other thread has published (and evicted) by now
            assert fetched.path is not None
            assert Path(fetched.path).read_bytes() == sandbox.object_path(BUCKET, f"out/{n}.wav").read_bytes()
            all_read.wait()
        except BaseException:
            all_fetched.abort()  # the others would wait for this thread for ever
            all_read.abort()
            raise

    run_threads(threads, fetch_then_deliver)

    # Over budget while all six were in use; their threads have ended, so the next fetch evicts.
    assert len(staged_files(staging)) == threads
    staging.fetch(client, "job-next", put(sandbox, "out/next.wav", MIB))
    left = staged_files(staging)
    assert "job-next" in left
    assert sum(left.values()) <= staging.max_bytes


def test_concurrent_fetches_releases_and_evictions_keep_the_directory_consistent(
    sandbox: Sandbox, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    threads, rounds = 4, 6
    sizes = {(n, r): (n + 1) * 100_000 + r for n in range(threads) for r in range(rounds)}
    places = {job: put(sandbox, f"out/{job[0]}-{job[1]}.wav", size) for job, size in sizes.items()}
    staging = Staging(str(tmp_path), 1_000_000, "0123abcd")
    client = sandbox.client(REGION)
    sandbox.faults.add(Fault(kind="object GET", delay=0.01))  # longer downloads: more of them overlap

    def churn(n: int) -> None:
        for r in range(rounds):
            job_id = f"job-{n}-{r}"
            fetched = staging.fetch(client, job_id, places[n, r])
            assert fetched.path is not None
            assert Path(fetched.path).read_bytes() == sandbox.object_path(BUCKET, f"out/{n}-{r}.wav").read_bytes()
            if r % 2:  # every delivery done; the others stay staged for a retry
                staging.release(job_id)

    with caplog.at_level(logging.INFO, logger="webhook.worker"):
        run_threads(threads, churn)
    assert any("evicted the staged download" in record.getMessage() for record in caplog.records)

    left = staged_files(staging)
    assert not any(job.endswith(("-1", "-3", "-5")) for job in left)  # released
    for job, size in left.items():
        n, r = (int(part) for part in job.split("-")[1:])
        assert size == sizes[n, r]
        assert staging.staged(job, places[n, r]) is not None
    # Within the budget, unless what the threads were working on at the last eviction was more.
    assert sum(left.values()) <= max(staging.max_bytes, sum(sizes[n, rounds - 2] for n in range(threads)))
    staging.fetch(client, "job-next", put(sandbox, "out/next.wav", 1000))  # their threads have ended
    assert sum(staged_files(staging).values()) <= staging.max_bytes
