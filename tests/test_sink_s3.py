"""S3Sink over HTTP against moto's standalone server: bytes, metadata, order, multipart, errors, presigning."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import boto3
import pytest
import requests
from support.moto_server import MotoServer
from support.pipeline import Pipeline
from support.receiver import Receiver, Reply

from webhook.config import Settings
from webhook.errors import ConfigError
from webhook.models import Event, FetchedFile, Job, ObjectLocation
from webhook.sinks import DeliveryError
from webhook.sinks.build import build_sinks, sink_context
from webhook.sinks.events import build_event, event_document, event_id
from webhook.sinks.options import S3Options
from webhook.sinks.s3 import S3Sink

MiB = 1024 * 1024
KEY_ID = "AKIDTESTKEY0000000001"
SECRET = "secret-never-in-messages-0123456789"
AUDIO = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and a bit


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


def s3_client(url: str) -> Any:
    """A plain boto3 client to moto, to look at what the sink wrote."""
    return boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET
    )


@pytest.fixture(scope="module")
def client(moto: MotoServer) -> Any:
    """One for the module: making a boto3 client costs more than most of these tests."""
    return s3_client(moto.url)


@pytest.fixture
def bucket(client: Any) -> str:
    name = f"sink-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


def make_sink(url: str, bucket: str, prefix: str = "denoised/", threshold_mib: int = 16, chunk_mib: int = 8) -> S3Sink:
    options = S3Options(
        bucket=bucket,
        prefix=prefix,
        endpoint_url=url,
        multipart_threshold_mib=threshold_mib,
        multipart_chunk_mib=chunk_mib,
    )
    return S3Sink("archive", options, access_key_id=KEY_ID, secret_access_key=SECRET)


@pytest.fixture
def sink(moto: MotoServer, bucket: str) -> Iterator[S3Sink]:
    sink = make_sink(moto.url, bucket)
    yield sink
    sink.close()


def succeeded(
    tmp_path: Path,
    content: bytes = AUDIO,
    *,
    size: int = 0,
    key: str = "out/a.wav",
    user_data: str = "order-42",
    job_id: str = "job-1",
) -> Event:
    """A succeeded event whose file holds ``content``, or ``size`` pseudo-random bytes written 1 MiB at a time."""
    source = tmp_path / f"{job_id}.part"
    with source.open("wb") as out:
        out.write(content)
        for _ in range(size // MiB):
            out.write(hashlib.shake_256(out.tell().to_bytes(8, "big")).digest(MiB))
    job = Job(
        job_id=job_id,
        tag="NoiseReduction",
        state="Success",
        output=ObjectLocation("b-1250000000", "r", key),
        user_data=user_data,
    )
    fetched = FetchedFile(path=str(source), size=source.stat().st_size, crc64="1", content_type="audio/wav")
    return build_event(job, "archive", fetched)


def failed() -> Event:
    job = Job(job_id="job-2", tag="NoiseReduction", state="Failed", code="InvalidInput", message="bad audio")
    return build_event(job, "archive", None)


def keys(client: Any, bucket: str) -> list[str]:
    return sorted(item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def test_uploads_audio_then_metadata(tmp_path: Path, sink: S3Sink, client: Any, bucket: str) -> None:
    event = succeeded(tmp_path)
    calls: list[tuple[str, str]] = []
    # botocore's own event hooks: the order of the requests the sink makes, nothing replaced.
    sink._client.meta.events.register(
        "before-parameter-build.s3", lambda model, params, **_: calls.append((model.name, params.get("Key", "")))
    )
    sink.deliver(event)

    assert keys(client, bucket) == ["denoised/job-1.event.json", "denoised/job-1.wav"]
    audio = client.get_object(Bucket=bucket, Key="denoised/job-1.wav")
    assert audio["Body"].read() == AUDIO
    assert audio["ContentType"] == "audio/wav"
    assert audio["Metadata"] == {"job-id": "job-1", "event-id": event.event_id, "user-data": "order-42"}
    document = client.get_object(Bucket=bucket, Key="denoised/job-1.event.json")
    assert document["ContentType"] == "application/json"
    assert json.loads(document["Body"].read()) == event_document(event, ["denoised/job-1.wav"])
    # The JSON is written last, after the audio's size was checked: its presence means the audio is complete.
    assert calls == [
        ("PutObject", "denoised/job-1.wav"),
        ("HeadObject", "denoised/job-1.wav"),
        ("PutObject", "denoised/job-1.event.json"),
    ]


def test_extension_comes_from_the_output_key(tmp_path: Path, sink: S3Sink, client: Any, bucket: str) -> None:
    sink.deliver(succeeded(tmp_path, key="out/meeting.denoised.mp3"))
    sink.deliver(succeeded(tmp_path, key="out/no-extension"))
    assert keys(client, bucket) == ["denoised/job-1.bin", "denoised/job-1.event.json", "denoised/job-1.mp3"]


def test_output_key_ending_in_json_keeps_audio_and_document_apart(
    tmp_path: Path, sink: S3Sink, client: Any, bucket: str
) -> None:
    event = succeeded(tmp_path, key="out/denoised.json")
    sink.deliver(event)
    assert keys(client, bucket) == ["denoised/job-1.event.json", "denoised/job-1.json"]
    audio = client.get_object(Bucket=bucket, Key="denoised/job-1.json")
    assert audio["Body"].read() == AUDIO
    assert audio["ContentType"] == "audio/wav"
    document = client.get_object(Bucket=bucket, Key="denoised/job-1.event.json")["Body"].read()
    assert json.loads(document) == event_document(event, ["denoised/job-1.json"])
    location = sink.location(event.job)
    assert location is not None
    assert location.key == "denoised/job-1.json"


def test_non_ascii_user_data_is_percent_encoded(tmp_path: Path, sink: S3Sink, client: Any, bucket: str) -> None:
    user_data = "订单 42 / 100%"
    sink.deliver(succeeded(tmp_path, user_data=user_data))
    encoded = client.head_object(Bucket=bucket, Key="denoised/job-1.wav")["Metadata"]["user-data"]
    assert encoded.isascii()
    assert unquote(encoded) == user_data


def test_user_data_too_long_for_metadata_is_left_to_the_json(
    tmp_path: Path, sink: S3Sink, client: Any, bucket: str
) -> None:
    sink.deliver(succeeded(tmp_path, user_data="数据" * 200))  # 2 400 characters once encoded
    assert "user-data" not in client.head_object(Bucket=bucket, Key="denoised/job-1.wav")["Metadata"]
    document = json.loads(client.get_object(Bucket=bucket, Key="denoised/job-1.event.json")["Body"].read())
    assert document["job"]["user_data"] == "数据" * 200


@pytest.mark.slow
def test_large_file_goes_multipart_with_flat_memory(tmp_path: Path, moto: MotoServer, client: Any, bucket: str) -> None:
    event = succeeded(tmp_path, b"", size=40 * MiB)
    assert event.file is not None
    assert event.file.path is not None
    sink = make_sink(moto.url, bucket, threshold_mib=5, chunk_mib=5)
    tracemalloc.start()
    try:
        sink.deliver(event)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        sink.close()

    head = client.head_object(Bucket=bucket, Key="denoised/job-1.wav")
    assert head["ETag"].strip('"').endswith("-8")  # eight 5 MiB parts
    assert head["ContentLength"] == 40 * MiB
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB for a 40 MiB file"
    downloaded = tmp_path / "downloaded"
    client.download_file(bucket, "denoised/job-1.wav", str(downloaded))
    assert sha256_of(downloaded) == sha256_of(Path(event.file.path))


@pytest.mark.slow
def test_parallel_multipart_uploads_keep_their_connections(
    tmp_path: Path, moto: MotoServer, client: Any, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    # As the worker's 8 threads deliver: each upload sends its two parts at once, 16 requests in all.
    sink = make_sink(moto.url, bucket, prefix="", threshold_mib=1, chunk_mib=5)
    events = [succeeded(tmp_path, size=6 * MiB, job_id=f"job-{n:02d}") for n in range(16)]

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(sink.deliver, events))
    sink.close()

    assert keys(client, bucket) == sorted(f"job-{n:02d}{ext}" for n in range(16) for ext in (".wav", ".event.json"))
    assert [r.getMessage() for r in caplog.records if "pool is full" in r.getMessage()] == []


def test_failed_job_writes_only_metadata(sink: S3Sink, client: Any, bucket: str) -> None:
    event = failed()
    sink.deliver(event)
    assert keys(client, bucket) == ["denoised/job-2.event.json"]
    document = json.loads(client.get_object(Bucket=bucket, Key="denoised/job-2.event.json")["Body"].read())
    assert document == event_document(event)
    assert document["file"] is None


def test_redelivery_overwrites_the_same_keys(tmp_path: Path, sink: S3Sink, client: Any, bucket: str) -> None:
    sink.deliver(succeeded(tmp_path, b"first attempt"))
    sink.deliver(succeeded(tmp_path))
    sink.deliver(succeeded(tmp_path))
    assert keys(client, bucket) == ["denoised/job-1.event.json", "denoised/job-1.wav"]
    assert client.get_object(Bucket=bucket, Key="denoised/job-1.wav")["Body"].read() == AUDIO


def test_size_mismatch_is_retryable_and_writes_no_json(tmp_path: Path, sink: S3Sink, client: Any, bucket: str) -> None:
    event = succeeded(tmp_path)
    assert event.file is not None
    truncated = tmp_path / "truncated"
    truncated.write_bytes(AUDIO[:1000])  # the file on disk is shorter than the fetched size says
    event = build_event(event.job, "archive", FetchedFile(str(truncated), len(AUDIO), "1", "audio/wav"))
    with pytest.raises(DeliveryError) as caught:
        sink.deliver(event)
    assert not caught.value.permanent
    assert f"holds 1000 bytes, expected {len(AUDIO)}" in caught.value.message
    assert "denoised/job-1.event.json" not in keys(client, bucket)


def test_missing_bucket_is_permanent(tmp_path: Path, moto: MotoServer) -> None:
    sink = make_sink(moto.url, "no-such-bucket")
    with pytest.raises(DeliveryError) as caught:
        sink.deliver(succeeded(tmp_path))
    assert caught.value.permanent
    message = caught.value.message
    assert message.startswith("archive: upload s3://no-such-bucket/denoised/job-1.wav: NoSuchBucket (HTTP 404)")
    assert SECRET not in message
    assert KEY_ID not in message


def test_missing_bucket_for_failure_event_is_permanent(moto: MotoServer) -> None:
    with pytest.raises(DeliveryError, match=r"put_object .*NoSuchBucket") as caught:
        make_sink(moto.url, "no-such-bucket").deliver(failed())
    assert caught.value.permanent


def test_unreadable_file_is_retryable(tmp_path: Path, sink: S3Sink) -> None:
    event = succeeded(tmp_path)
    assert event.file is not None
    assert event.file.path is not None
    Path(event.file.path).unlink()
    with pytest.raises(DeliveryError, match="cannot read") as caught:
        sink.deliver(event)
    assert not caught.value.permanent


SLOW_DOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"


@pytest.mark.parametrize(
    ("reply", "reason", "retry_after"),
    [
        (Reply(503, retry_after="7", body=SLOW_DOWN), "SlowDown (HTTP 503) Please reduce your request rate.", 7.0),
        (Reply(500), "500 (HTTP 500) Internal Server Error", None),
    ],
    ids=["503-slow-down", "500-no-body"],
)
def test_server_errors_are_retryable(tmp_path: Path, reply: Reply, reason: str, retry_after: float | None) -> None:
    # moto cannot be told to fail, so a local server that answers every request this way is the endpoint.
    with Receiver(reply) as server:
        sink = make_sink(server.url.rstrip("/"), "audio")
        with pytest.raises(DeliveryError) as caught:
            sink.deliver(succeeded(tmp_path))
        sink.close()
    assert not caught.value.permanent
    assert caught.value.message == f"archive: upload s3://audio/denoised/job-1.wav: {reason}"
    assert caught.value.retry_after == retry_after
    # botocore retries a request once at most; backoff beyond that is the worker's.
    assert [request.method for request in server.requests] == ["PUT", "PUT"]
    assert server.requests[0].path == "/audio/denoised/job-1.wav"  # path-style with a custom endpoint
    # The store can refuse damaged bytes: botocore sends the body's CRC32 (and, over plain HTTP, its SHA-256).
    assert "x-amz-checksum-crc32" in server.requests[0].headers


def test_check_names_bucket_and_endpoint(sink: S3Sink, moto: MotoServer, bucket: str) -> None:
    assert sink.check() == "reachable"


def test_check_fails_for_a_missing_bucket(moto: MotoServer) -> None:
    with pytest.raises(DeliveryError, match=r"^archive: head_bucket s3://nowhere/: 404 \(HTTP 404\)") as caught:
        make_sink(moto.url, "nowhere").check()
    assert caught.value.permanent


def test_invalid_region_is_a_config_error() -> None:
    options = S3Options(bucket="audio", region="not a region!")
    with pytest.raises(ConfigError, match=r"^sink archive: .*not a region!"):
        S3Sink("archive", options, access_key_id=None, secret_access_key=None)


def test_location_presigns_a_download(tmp_path: Path, sink: S3Sink, bucket: str) -> None:
    event = succeeded(tmp_path)
    sink.deliver(event)
    location = sink.location(event.job, presign_seconds=60)
    assert location is not None
    assert (location.kind, location.bucket, location.key, location.region) == (
        "s3",
        bucket,
        "denoised/job-1.wav",
        "us-east-1",
    )
    response = requests.get(location.url, timeout=10)
    assert response.status_code == 200
    assert response.content == AUDIO
    assert "X-Amz-Expires=60" in location.url  # SigV4: SigV2 presigning is deprecated

    unsigned = sink.location(event.job)
    assert unsigned is not None
    assert unsigned.url == ""
    assert sink.location(failed().job) is None


def write_config(path: Path, moto: MotoServer, bucket: str) -> Path:
    """A sinks file declaring the ``archive`` s3 sink, its credentials in ARCHIVE_KEY_ID and ARCHIVE_SECRET."""
    path.write_text(
        f"""
[[sinks]]
name = "archive"
type = "s3"
[sinks.options]
bucket = "{bucket}"
prefix = "denoised/"
endpoint_url = "{moto.url}"
access_key_id_env = "ARCHIVE_KEY_ID"
secret_access_key_env = "ARCHIVE_SECRET"
"""
    )
    return path


def test_declared_in_toml_and_built_with_credentials_from_the_environment(
    tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    config = write_config(tmp_path / "sinks.toml", moto, bucket)
    environ = {"ARCHIVE_KEY_ID": KEY_ID, "ARCHIVE_SECRET": SECRET}
    sinks = build_sinks(Settings(config_path=str(config)).sinks, sink_context(Settings(), environ))
    assert isinstance(sinks["archive"], S3Sink)
    assert sinks["archive"].check() == "reachable"

    with pytest.raises(ConfigError, match="sink archive: set both ARCHIVE_KEY_ID and ARCHIVE_SECRET"):
        build_sinks(Settings(config_path=str(config)).sinks, sink_context(Settings(), {"ARCHIVE_KEY_ID": KEY_ID}))


def test_callback_to_s3_end_to_end(
    pipeline: Pipeline, moto: MotoServer, client: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real CI callback from the sandbox, through receiver, ledger and worker, to moto over HTTP."""
    monkeypatch.setenv("ARCHIVE_KEY_ID", KEY_ID)
    monkeypatch.setenv("ARCHIVE_SECRET", SECRET)
    config = write_config(tmp_path / "sinks.toml", moto, bucket)
    job_id, status = pipeline.run_job(config, user_data="订单-42")
    assert status == "delivered"

    expected = pipeline.output_bytes()
    audio = client.get_object(Bucket=bucket, Key=f"denoised/{job_id}.wav")
    assert audio["Body"].read() == expected
    assert audio["Metadata"]["event-id"] == event_id(job_id, "archive")
    assert unquote(audio["Metadata"]["user-data"]) == "订单-42"
    document = json.loads(client.get_object(Bucket=bucket, Key=f"denoised/{job_id}.event.json")["Body"].read())
    assert document["event_id"] == event_id(job_id, "archive")
    assert document["job"]["user_data"] == "订单-42"
    assert document["file"]["size"] == len(expected)
    assert audio["ContentType"] == document["file"]["content_type"]
    deliveries = pipeline.ledger.views.show_job(job_id).to_dict()["deliveries"]
    assert sorted((d["sink"], d["status"], d["attempts"]) for d in deliveries) == [
        ("archive", "done", 1),
        ("filesystem", "done", 1),
        ("http", "done", 1),
    ]
