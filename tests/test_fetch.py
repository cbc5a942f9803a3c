"""The fetch step against the sandbox with the real SDK: streamed, length- and CRC64-checked."""

from __future__ import annotations

import os
from pathlib import Path

import crcmod
import pytest

from webhook.crc64 import crc64ecma
from webhook.fetch import FetchError, fetch_object, sweep_staging
from webhook.models import ObjectLocation
from webhook.sandbox import Sandbox

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
    from webhook.cos import make_client

    client = make_client(sandbox.secret_id, "not-the-key", REGION, sandbox.endpoint)
    with pytest.raises(FetchError, match=r"^COS answered 403 SignatureDoesNotMatch for out/a\.wav: .+ " + REQUEST_ID):
        fetch_object(client, ObjectLocation(BUCKET, REGION, "out/a.wav"), str(tmp_path))


def test_unreachable_cos(tmp_path: Path) -> None:
    from webhook.cos import CosEndpoint, make_client

    client = make_client("id", "key", REGION, CosEndpoint("http", "127.0.0.1", 9))
    with pytest.raises(FetchError, match=r"^COS unreachable: "):
        fetch_object(client, ObjectLocation(BUCKET, REGION, "out/a.wav"), str(tmp_path))


def test_sweep_removes_only_abandoned_downloads(tmp_path: Path) -> None:
    abandoned, live, other = tmp_path / "cos-webhook-a.part", tmp_path / "cos-webhook-b.part", tmp_path / "x.part"
    for path in (abandoned, live, other):
        path.write_bytes(b"partial")
    os.utime(abandoned, (0, 0))
    os.utime(other, (0, 0))
    assert sweep_staging(str(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cos-webhook-b.part", "x.part"]
