"""Staged downloads against the sandbox with the real SDK: fetched once, whole, within a budget."""

from __future__ import annotations

import os
from pathlib import Path

from webhook.models import ObjectLocation
from webhook.sandbox import Fault, Sandbox
from webhook.staging import Staging

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
