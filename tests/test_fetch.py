"""The fetch step against the sandbox with the real SDK: streamed, length- and CRC64-checked."""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import crcmod
import pytest
from support.trickle import Trickle, response

from webhook.ci.client import make_client
from webhook.ci.crc64 import crc64ecma
from webhook.ci.fetch import FetchError, describe_object, fetch_object
from webhook.config_values import parse_endpoint
from webhook.dev.sandbox import Sandbox
from webhook.dev.sandbox.faults import Fault
from webhook.models import FetchedFile, ObjectLocation

BUCKET, REGION = "audio-1250000000", "ap-guangzhou"
REQUEST_ID = r"\(request_id=[0-9a-f]{32}\)$"  # the sandbox's, as COS names each answer


def test_crcmod_uses_its_c_extension() -> None:
    # Without the compiled extension crcmod silently falls back to pure Python, far slower.
    assert crcmod._crcfunext is not None
    assert crc64ecma.__module__ != "crcmod._crcfunpy"


def test_crc64_continues_across_chunks() -> None:
    data = os.urandom(10_000)
    assert crc64ecma(data[5000:], crc64ecma(data[:5000])) == crc64ecma(data)


def test_fetch_streams_the_object_and_reports_its_checksums(sandbox: Sandbox, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    answer = sandbox.client(REGION).put_object(Bucket=BUCKET, Body=data, Key="out/a.wav", ContentType="audio/wav")

    staging = tmp_path / "staging"
    staging.mkdir()
    fetched = fetch_object(sandbox.client(REGION), ObjectLocation(BUCKET, REGION, "out/a.wav"), str(staging))

    assert Path(fetched.path).read_bytes() == data
    assert Path(fetched.path).parent == staging
    assert (fetched.size, fetched.crc64) == (len(data), str(crc64ecma(data)))
    assert fetched.crc64 == answer["x-cos-hash-crc64ecma"]
    assert fetched.content_type == "audio/wav"
    assert fetched.etag == answer["ETag"].strip('"')


def test_missing_object_leaves_no_temp_file(sandbox: Sandbox, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(FetchError, match=r"^COS answered 404 NoSuchKey for out/none\.wav: .+ " + REQUEST_ID):
        fetch_object(sandbox.client(REGION), ObjectLocation(BUCKET, REGION, "out/none.wav"), str(staging))
    assert list(staging.iterdir()) == []


def test_wrong_credentials(sandbox: Sandbox, tmp_path: Path) -> None:
    from webhook.ci.client import make_client

    client = make_client(sandbox.secret_id, "not-the-key", REGION, sandbox.endpoint)
    with pytest.raises(FetchError, match=r"^COS answered 403 SignatureDoesNotMatch for out/a\.wav: .+ " + REQUEST_ID):
        fetch_object(client, ObjectLocation(BUCKET, REGION, "out/a.wav"), str(tmp_path))


@pytest.mark.slow  # the SDK waits a second before its retry
def test_unreachable_cos(tmp_path: Path) -> None:
    from webhook.ci.client import make_client
    from webhook.config_values import CosEndpoint

    client = make_client("id", "key", REGION, CosEndpoint("http", "127.0.0.1", 9))
    with pytest.raises(FetchError, match=r"^COS unreachable: "):
        fetch_object(client, ObjectLocation(BUCKET, REGION, "out/a.wav"), str(tmp_path))


def paced_object(data: bytes) -> Trickle:
    """A COS stand-in that sends the headers at once and ``data`` in six pieces, 0.1 s apart."""
    answer = response(data, headers={"Content-Type": "audio/wav", "x-cos-hash-crc64ecma": str(crc64ecma(data))})
    return Trickle(answer, head=len(answer) - len(data), chunk=-(-len(data) // 6), every=0.1)


@pytest.mark.slow  # a deadline of a second runs out
def test_a_trickling_cos_passes_the_deadline(tmp_path: Path) -> None:
    with Trickle(every=0.3) as server:
        client = make_client("id", "key", REGION, endpoint=parse_endpoint(server.url), timeout=1)
        with pytest.raises(FetchError) as caught:
            fetch_object(client, ObjectLocation(BUCKET, REGION, "out/a.wav"), str(tmp_path))
        with pytest.raises(FetchError) as described:
            describe_object(client, ObjectLocation(BUCKET, REGION, "out/a.wav"), timeout=0.5)
    assert str(caught.value) == "COS GetObject out/a.wav: no complete answer within 1s (deadline)"
    assert str(described.value) == "COS HeadObject out/a.wav: no complete answer within 0.5s (deadline)"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a deadline of a second runs out
def test_a_large_object_gets_its_time_at_the_minimum_rate(tmp_path: Path) -> None:
    data = os.urandom(600_000)
    where = ObjectLocation(BUCKET, REGION, "out/a.wav")
    with paced_object(data) as server:
        client = make_client("id", "key", REGION, endpoint=parse_endpoint(server.url), timeout=60)
        # 0.3 s is too little for the whole body, but 600 kB at 200 kB/s adds 3 s.
        fetched = fetch_object(client, where, str(tmp_path), timeout=0.3, min_rate=200_000, part_prefix="w1-")
        assert Path(fetched.path).read_bytes() == data
        assert Path(fetched.path).name.startswith("w1-")
        os.unlink(fetched.path)

        # With no time for its bytes, the same download is abandoned and its partial file removed.
        with pytest.raises(FetchError) as caught:
            fetch_object(client, where, str(tmp_path), timeout=0.3, min_rate=10**12)
    assert re.fullmatch(
        r"download of out/a\.wav broke off after \d+ bytes: no complete answer within 0\.3s \(deadline\)",
        str(caught.value),
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a deadline of a second runs out
def test_a_delayed_sandbox_answer_passes_the_deadline_then_fetches_fine(sandbox: Sandbox, tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024)
    sandbox.client(REGION).put_object(Bucket=BUCKET, Body=data, Key="out/a.wav")
    where = ObjectLocation(BUCKET, REGION, "out/a.wav")
    staging = tmp_path / "staging"
    staging.mkdir()
    sandbox.faults.add(Fault(kind="object GET", delay=30, times=1))
    sandbox.faults.add(Fault(kind="object HEAD", delay=30, times=1))

    client = make_client(sandbox.secret_id, sandbox.secret_key, REGION, sandbox.endpoint, timeout=0.5)
    with pytest.raises(FetchError, match=r"^COS GetObject out/a\.wav: no complete answer within 0\.5s \(deadline\)$"):
        fetch_object(client, where, str(staging))
    with pytest.raises(FetchError, match=r"^COS HeadObject out/a\.wav: no complete answer within 0\.5s \(deadline\)$"):
        describe_object(client, where)
    assert list(staging.iterdir()) == []

    sandbox.faults.clear()
    fetched = fetch_object(client, where, str(staging), timeout=10)  # the client is reused afterwards
    assert Path(fetched.path).read_bytes() == data
    assert describe_object(client, where).size == len(data)


def test_threads_sharing_one_client_each_fetch_their_own_object_intact(sandbox: Sandbox, tmp_path: Path) -> None:
    """As a worker's claim threads do: one SDK client (one connection pool) per region for all of them."""
    client = sandbox.client(REGION)
    objects = {f"out/{n}.wav": os.urandom(1024 * 1024 + n * 4099) for n in range(8)}
    for key, data in objects.items():
        client.put_object(Bucket=BUCKET, Body=data, Key=key)

    def fetch(key: str) -> FetchedFile:
        return fetch_object(client, ObjectLocation(BUCKET, REGION, key), str(tmp_path))

    with ThreadPoolExecutor(len(objects)) as pool:
        fetched = dict(zip(objects, pool.map(fetch, objects), strict=True))

    for key, data in objects.items():
        assert Path(fetched[key].path).read_bytes() == data
        assert (fetched[key].size, fetched[key].crc64) == (len(data), str(crc64ecma(data)))


def test_the_md5_ci_reported_is_checked_and_carried(sandbox: Sandbox, tmp_path: Path) -> None:
    data = os.urandom(700_001)
    sandbox.client(REGION).put_object(Bucket=BUCKET, Body=data, Key="out/md5.wav")
    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()

    fetched = fetch_object(
        sandbox.client(REGION), ObjectLocation(BUCKET, REGION, "out/md5.wav"), str(tmp_path), md5=md5
    )

    assert Path(fetched.path).read_bytes() == data
    assert fetched.md5 == md5


def test_an_md5_mismatch_names_both_digests_and_leaves_nothing(sandbox: Sandbox, tmp_path: Path) -> None:
    data = os.urandom(70_001)
    sandbox.client(REGION).put_object(Bucket=BUCKET, Body=data, Key="out/md5.wav")
    actual = hashlib.md5(data, usedforsecurity=False).hexdigest()
    claimed = "0" * 32
    staging = tmp_path / "staging"
    staging.mkdir()

    with pytest.raises(FetchError) as caught:
        fetch_object(sandbox.client(REGION), ObjectLocation(BUCKET, REGION, "out/md5.wav"), str(staging), md5=claimed)

    assert str(caught.value) == f"out/md5.wav failed its MD5 check: CI says {claimed}, got {actual}"
    assert list(staging.iterdir()) == []
