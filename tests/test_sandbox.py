"""The COS/CI sandbox, driven by the real cos-python-sdk-v5 over real sockets."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import wave
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import xmltodict
from qcloud_cos import CosClientError, CosServiceError
from qcloud_cos.cos_auth import CosS3Auth
from support.receiver import Receiver, Reply
from support.sandbox_jobs import held_jobs
from urllib3.exceptions import ProtocolError

from webhook.ci.client import make_client
from webhook.ci.crc64 import crc64ecma
from webhook.config_values import CosEndpoint
from webhook.dev.sandbox import CallbackShape, Fault, Sandbox, noisy_wav
from webhook.dev.sandbox.server import FAULTS_PATH
from webhook.intake.callback import parse_callback
from webhook.models import ObjectLocation

BUCKET = "examplebucket-1250000000"
OTHER_BUCKET = "otherbucket-1250000000"
REGION = "ap-guangzhou"


@pytest.fixture
def client(sandbox: Sandbox) -> Any:
    return sandbox.client(REGION)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """Where the sandbox POSTs job callbacks (to ``receiver.url + "callback"``)."""
    with Receiver() as receiver:
        yield receiver


def noise_reduction(
    input_key: str, output_key: str, callback: str = "", callback_format: str = "XML", audio_format: str = "wav"
) -> dict[str, Any]:
    """The ``Jobs`` argument of ``ci_create_media_jobs`` for a NoiseReduction job."""
    return {
        "Tag": "NoiseReduction",
        "Input": {"Object": input_key},
        "Operation": {
            "NoiseReduction": {"Format": audio_format, "SampleRate": "16000"},
            "Output": {"Region": REGION, "Bucket": BUCKET, "Object": output_key},
            "UserData": "test run",
            "JobLevel": "0",
        },
        "CallBack": callback,
        "CallBackFormat": callback_format,
    }


def upload_noisy_wav(client: Any, tmp_path: Path, key: str, seconds: float = 1.0) -> None:
    path = noisy_wav(tmp_path / "noisy.wav", seconds)
    with path.open("rb") as body:
        client.put_object(Bucket=BUCKET, Key=key, Body=body)


def start_job(client: Any, tmp_path: Path, callback: str = "") -> str:
    """Upload a noisy in.wav and submit a job that writes out.wav; return the JobId."""
    upload_noisy_wav(client, tmp_path, "in.wav")
    response = client.ci_create_media_jobs(Bucket=BUCKET, Jobs=noise_reduction("in.wav", "out.wav", callback))
    job_id: str = response["JobsDetail"][0]["JobId"]
    return job_id


def read_object(client: Any, key: str, bucket: str = BUCKET) -> bytes:
    data: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].get_raw_stream().read()
    return data


def service_error(call: Any, **kwargs: Any) -> CosServiceError:
    with pytest.raises(CosServiceError) as info:
        call(**kwargs)
    return info.value


def wait_for_state(client: Any, job_id: str, state: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        detail: dict[str, Any] = client.ci_get_media_jobs(Bucket=BUCKET, JobIDs=job_id)["JobsDetail"][0]
        if detail["State"] == state or time.monotonic() > deadline:
            assert detail["State"] == state
            return detail
        time.sleep(0.02)


# --- COS objects ---------------------------------------------------------------------------


def test_put_get_head_delete_round_trip(client: Any) -> None:
    key = "dir/a b+ü?.txt"
    data = b"hello sandbox" * 1000
    etag = f'"{hashlib.md5(data).hexdigest()}"'

    put = client.put_object(Bucket=BUCKET, Key=key, Body=data, ContentType="text/plain")
    assert put["ETag"] == etag
    assert put["x-cos-hash-crc64ecma"] == str(crc64ecma(data))

    got = client.get_object(Bucket=BUCKET, Key=key)
    assert got["Body"].get_raw_stream().read() == data
    head = client.head_object(Bucket=BUCKET, Key=key)
    for headers in (got, head):
        assert headers["Content-Length"] == str(len(data))
        assert headers["ETag"] == etag
        assert headers["Content-Type"] == "text/plain"
        assert headers["x-cos-hash-crc64ecma"] == str(crc64ecma(data))
        assert headers["x-cos-request-id"]

    client.delete_object(Bucket=BUCKET, Key=key)
    assert service_error(client.head_object, Bucket=BUCKET, Key=key).get_status_code() == 404


def test_put_streams_a_chunked_body_to_disk(sandbox: Sandbox, client: Any) -> None:
    chunks = [bytes([n]) * 100_000 for n in range(20)]

    client.put_object(Bucket=BUCKET, Key="chunked.bin", Body=iter(chunks))  # no length: chunked encoding

    assert sandbox.object_path(BUCKET, "chunked.bin").read_bytes() == b"".join(chunks)
    assert client.head_object(Bucket=BUCKET, Key="chunked.bin")["Content-Length"] == "2000000"


def test_ranged_download_with_crc_check(client: Any, tmp_path: Path) -> None:
    data = bytes(range(256)) * (12 * 1024)  # 3 MiB: download_file fetches it in 1 MiB ranges
    client.put_object(Bucket=BUCKET, Key="big.bin", Body=data)

    target = tmp_path / "big.bin"
    client.download_file(Bucket=BUCKET, Key="big.bin", DestFilePath=str(target), PartSize=1, EnableCRC=True)
    part = client.get_object(Bucket=BUCKET, Key="big.bin", Range="bytes=10-19")

    assert target.read_bytes() == data
    assert part["Body"].get_raw_stream().read() == data[10:20]
    assert part["Content-Range"] == f"bytes 10-19/{len(data)}"


def test_missing_object_is_404_no_such_key(client: Any) -> None:
    error = service_error(client.get_object, Bucket=BUCKET, Key="missing.wav")

    assert error.get_status_code() == 404
    assert error.get_error_code() == "NoSuchKey"
    assert "missing.wav" in error.get_error_msg()
    assert error.get_request_id()


@pytest.mark.parametrize(
    ("secret_id", "secret_key", "code"),
    [
        ("sandbox-secret-id", "wrong-key", "SignatureDoesNotMatch"),
        ("someone-else", "sandbox-secret-key", "InvalidAccessKeyId"),
    ],
)
def test_bad_credentials_are_403(sandbox: Sandbox, secret_id: str, secret_key: str, code: str) -> None:
    client = make_client(secret_id, secret_key, REGION, sandbox.endpoint)

    for call, kwargs in (
        (client.put_object, {"Bucket": BUCKET, "Key": "a.txt", "Body": b"x"}),
        (client.ci_get_media_jobs, {"Bucket": BUCKET, "JobIDs": "j" + "0" * 32}),
    ):
        error = service_error(call, **kwargs)
        assert (error.get_status_code(), error.get_error_code()) == (403, code)
    assert not sandbox.object_path(BUCKET, "a.txt").exists()


def test_bucket_without_the_appid_does_not_exist(client: Any) -> None:
    error = service_error(client.put_object, Bucket="examplebucket", Key="a.txt", Body=b"x")

    assert (error.get_status_code(), error.get_error_code()) == (404, "NoSuchBucket")


@pytest.mark.slow  # the SDK waits a second before its retry
def test_multipart_calls_are_refused_not_mistaken_for_put(client: Any) -> None:
    error = service_error(client.create_multipart_upload, Bucket=BUCKET, Key="a.txt")

    assert (error.get_status_code(), error.get_error_code()) == (501, "NotImplemented")


def test_object_paths_stay_under_the_root(sandbox: Sandbox, client: Any) -> None:
    for key in ("../../escape.txt", "a/../../../b", "..\\..\\c"):
        client.put_object(Bucket=BUCKET, Key=key, Body=key.encode())
        path = sandbox.object_path(BUCKET, key)
        assert path.resolve().is_relative_to(sandbox.root.resolve())
        assert path.read_bytes() == key.encode()


def test_an_object_named_like_a_job_query_is_still_an_object(client: Any) -> None:
    client.put_object(Bucket=BUCKET, Key="jobs/report.txt", Body=b"not a job")

    assert read_object(client, "jobs/report.txt") == b"not a job"


def test_metadata_headers_are_kept_with_the_object(client: Any) -> None:
    client.put_object(
        Bucket=BUCKET, Key="m.wav", Body=b"x", ContentType="audio/wav", Metadata={"x-cos-meta-Job-Id": "j1"}
    )

    for headers in (client.head_object(Bucket=BUCKET, Key="m.wav"), client.get_object(Bucket=BUCKET, Key="m.wav")):
        assert headers["Content-Type"] == "audio/wav"
        assert headers["x-cos-meta-job-id"] == "j1"


@pytest.mark.parametrize(
    ("directive", "content_type", "metadata"),
    [("Copy", "text/plain", {"x-cos-meta-a": "1"}), ("Replaced", "audio/wav", {"x-cos-meta-b": "2"})],
)
def test_copy_object_keeps_or_replaces_the_metadata(
    client: Any, directive: str, content_type: str, metadata: dict[str, str]
) -> None:
    data = b"copied server-side" * 1000
    source_key = "src/a b+ü.txt"  # the SDK URL-encodes it in x-cos-copy-source
    put = client.put_object(
        Bucket=BUCKET, Key=source_key, Body=data, ContentType="text/plain", Metadata={"x-cos-meta-a": "1"}
    )

    copied = client.copy_object(
        Bucket=OTHER_BUCKET,
        Key="dst/c.txt",
        CopySource={"Bucket": BUCKET, "Key": source_key, "Region": "ap-shanghai"},
        CopyStatus=directive,
        ContentType="audio/wav",
        Metadata={"x-cos-meta-b": "2"},
    )

    assert (copied["ETag"], copied["CRC64"]) == (put["ETag"], put["x-cos-hash-crc64ecma"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", copied["LastModified"])
    assert read_object(client, "dst/c.txt", OTHER_BUCKET) == data
    head = client.head_object(Bucket=OTHER_BUCKET, Key="dst/c.txt")
    assert head["Content-Type"] == content_type
    assert {k: v for k, v in head.items() if k.startswith("x-cos-meta-")} == metadata


def test_copy_streams_file_to_file(client: Any) -> None:
    def copy_peak(size: int) -> int:
        """Peak memory traced while the sandbox (in this process) copies an object of ``size`` bytes."""
        client.put_object(Bucket=BUCKET, Key="big.bin", Body=b"\x01" * size)
        tracemalloc.start()
        try:
            source = {"Bucket": BUCKET, "Key": "big.bin", "Region": REGION}
            client.copy_object(Bucket=BUCKET, Key="big-copy.bin", CopySource=source)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = copy_peak(1024 * 1024), copy_peak(64 * 1024 * 1024)

    assert client.head_object(Bucket=BUCKET, Key="big-copy.bin")["Content-Length"] == str(64 * 1024 * 1024)
    # 63 MiB more to copy; a copy through memory would add at least that. The margin absorbs
    # allocations of other threads (servers left by earlier tests), which tracemalloc counts too.
    assert large - small < 16 * 1024 * 1024


def test_copy_errors(client: Any) -> None:
    missing = service_error(
        client.copy_object,
        Bucket=BUCKET,
        Key="b.txt",
        CopySource={"Bucket": BUCKET, "Key": "missing.txt", "Region": REGION},
    )
    client.put_object(Bucket=BUCKET, Key="a.txt", Body=b"x")
    onto_itself = service_error(
        client.copy_object, Bucket=BUCKET, Key="a.txt", CopySource={"Bucket": BUCKET, "Key": "a.txt", "Region": REGION}
    )

    assert (missing.get_status_code(), missing.get_error_code()) == (404, "NoSuchKey")
    assert (onto_itself.get_status_code(), onto_itself.get_error_code()) == (400, "InvalidRequest")


def test_head_bucket(client: Any) -> None:
    assert client.head_bucket(Bucket=BUCKET)["x-cos-bucket-region"] == REGION
    assert service_error(client.head_bucket, Bucket="examplebucket-1").get_status_code() == 404


def test_presigned_get_through_request_target(sandbox: Sandbox, client: Any) -> None:
    client.put_object(Bucket=BUCKET, Key="dir/p q.wav", Body=b"presigned bytes")
    # Signed for the bucket's own host: a client aimed at the sandbox's IP would sign the IP.
    signer = make_client(sandbox.secret_id, sandbox.secret_key, REGION)
    url = signer.get_presigned_url(Bucket=BUCKET, Key="dir/p q.wav", Method="GET", Expired=60)

    target, headers = sandbox.request_target(url)
    response = requests.get(target, headers=headers, timeout=10)

    assert url.startswith(f"https://{BUCKET}.cos.{REGION}.myqcloud.com/dir/p%20q.wav?q-sign-algorithm=sha1&")
    assert target.startswith(f"{sandbox.url}/dir/p%20q.wav?q-sign-algorithm=sha1&")
    assert headers == {"Host": f"{BUCKET}.cos.{REGION}.myqcloud.com"}
    assert (response.status_code, response.content) == (200, b"presigned bytes")


def test_presigned_urls_are_checked(sandbox: Sandbox, client: Any) -> None:
    client.put_object(Bucket=BUCKET, Key="p.wav", Body=b"x")
    signer = make_client(sandbox.secret_id, sandbox.secret_key, REGION)
    url = signer.get_presigned_url(Bucket=BUCKET, Key="p.wav", Method="GET", Expired=60)

    def get(presigned: str) -> tuple[int, str]:
        target, headers = sandbox.request_target(presigned)
        response = requests.get(target, headers=headers, timeout=10)
        code = xmltodict.parse(response.content)["Error"]["Code"] if response.content else ""
        return response.status_code, code

    expired = signer.get_presigned_url(Bucket=BUCKET, Key="p.wav", Method="GET", Expired=-1)
    assert get(expired) == (403, "AccessDenied")
    # Only q-key-time is signed; a later q-sign-time alone must not revive an expired URL.
    revived = re.sub(r"(q-sign-time=\d+%3B)\d+", lambda m: f"{m[1]}{int(time.time()) + 3600}", expired)
    assert revived != expired
    assert get(revived) == (403, "AccessDenied")
    assert get(url.replace("p.wav?", "other.wav?")) == (403, "SignatureDoesNotMatch")
    assert get(url[:-1] + ("0" if url[-1] != "0" else "1")) == (403, "SignatureDoesNotMatch")
    assert get(url + "&uploads") == (501, "NotImplemented")
    # What the SDK presigns with CosConfig(IP=...): the URL has the IP, so the bucket is lost.
    ip_url = client.get_presigned_url(Bucket=BUCKET, Key="p.wav", Method="GET", Expired=60)
    assert ip_url.startswith(f"{sandbox.url}/p.wav?")
    response = requests.get(ip_url, timeout=10)
    assert response.status_code == 400
    assert xmltodict.parse(response.content)["Error"]["Code"] == "InvalidURI"


# --- faults --------------------------------------------------------------------------------


def presigned(sandbox: Sandbox, key: str) -> tuple[str, dict[str, str]]:
    """A plain-HTTP GET of ``key``: the sandbox URL and the headers, signature included."""
    signer = make_client(sandbox.secret_id, sandbox.secret_key, REGION)
    return sandbox.request_target(signer.get_presigned_url(Bucket=BUCKET, Key=key, Method="GET", Expired=600))


def raw_get(sandbox: Sandbox, key: str) -> tuple[bytes, bytes, BaseException | None]:
    """GET over a bare socket: the header block, every body byte that arrived, and how the stream ended."""
    target, headers = presigned(sandbox, key)
    with socket.create_connection(("127.0.0.1", sandbox.port), timeout=10) as conn:
        conn.sendall(f"GET {target.removeprefix(sandbox.url)} HTTP/1.1\r\nHost: {headers['Host']}\r\n\r\n".encode())
        received, ended = b"", None
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except OSError as exc:
            ended = exc
    head, _, body = received.partition(b"\r\n\r\n")
    return head, body, ended


@pytest.mark.slow  # the SDK waits a second before its retry
def test_status_fault_answers_a_cos_error_for_the_next_n_requests(sandbox: Sandbox, client: Any) -> None:
    client.put_object(Bucket=BUCKET, Key="a.bin", Body=b"payload")
    active = sandbox.faults.add(Fault(kind="object GET", status=503, retry_after=7, times=3))

    target, headers = presigned(sandbox, "a.bin")
    response = requests.get(target, headers=headers, timeout=10)
    assert (response.status_code, response.headers["Retry-After"]) == (503, "7")
    assert xmltodict.parse(response.content)["Error"]["Code"] == "ServiceUnavailable"
    assert client.head_object(Bucket=BUCKET, Key="a.bin")["Content-Length"] == "7"  # another kind: untouched
    # The SDK retries a 5xx once, so this takes the other two.
    error = service_error(client.get_object, Bucket=BUCKET, Key="a.bin")
    assert (error.get_status_code(), error.get_error_code()) == (503, "ServiceUnavailable")

    assert (active.fired, sandbox.faults.active) == (3, [])
    assert read_object(client, "a.bin") == b"payload"


@pytest.mark.parametrize(
    "fault", [Fault(kind="object GET", reset=1000), Fault(kind="object GET", truncate=1000)], ids=["reset", "truncate"]
)
def test_broken_body_reaches_the_client_broken(sandbox: Sandbox, client: Any, fault: Fault) -> None:
    data = bytes(range(256)) * 400
    client.put_object(Bucket=BUCKET, Key="a.bin", Body=data)
    sandbox.faults.add(fault)

    head, body, ended = raw_get(sandbox, "a.bin")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"\r\nContent-Length: {len(data)}\r\n".encode() in head
    assert body == data[:1000]
    if fault.reset is not None:
        assert isinstance(ended, ConnectionResetError)
    else:
        assert ended is None  # a clean end of stream, 1000 bytes in

    # What the product's client (the SDK's streamed body over urllib3) makes of it.
    stream = client.get_object(Bucket=BUCKET, Key="a.bin")["Body"].get_raw_stream()
    with pytest.raises(ProtocolError, match="ConnectionResetError" if fault.reset is not None else "IncompleteRead"):
        stream.read()


def test_bad_crc_fault_keeps_the_body(sandbox: Sandbox, client: Any) -> None:
    data = b"checked bytes" * 100
    client.put_object(Bucket=BUCKET, Key="a.bin", Body=data)
    sandbox.faults.add(Fault(kind="object GET", path="/a.*", bad_crc=True))

    response = client.get_object(Bucket=BUCKET, Key="a.bin")
    assert response["Body"].get_raw_stream().read() == data
    assert response["x-cos-hash-crc64ecma"] != str(crc64ecma(data))
    assert client.head_object(Bucket=BUCKET, Key="a.bin")["x-cos-hash-crc64ecma"] == str(crc64ecma(data))


@pytest.mark.slow
def test_delay_holds_the_answer_until_cleared(sandbox: Sandbox, client: Any, tmp_path: Path) -> None:
    job_id = start_job(client, tmp_path)
    active = sandbox.faults.add(Fault(kind="CI describe", delay=600))
    impatient = make_client(sandbox.secret_id, sandbox.secret_key, REGION, sandbox.endpoint, timeout=0.2)
    with pytest.raises(CosClientError, match="Read timed out"):
        impatient.ci_get_media_jobs(Bucket=BUCKET, JobIDs=job_id)  # the SDK tries twice
    assert active.fired == 2

    answers: list[dict[str, Any]] = []
    waiting = threading.Thread(target=lambda: answers.append(client.ci_get_media_jobs(Bucket=BUCKET, JobIDs=job_id)))
    waiting.start()
    deadline = time.monotonic() + 10
    while active.fired < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert active.fired == 3  # this request is being held now
    sandbox.faults.clear()
    waiting.join(timeout=20)
    assert answers[0]["JobsDetail"][0]["JobId"] == job_id


def test_rate_fires_reproducibly_from_its_seed(sandbox: Sandbox, client: Any) -> None:
    client.put_object(Bucket=BUCKET, Key="a.bin", Body=b"x")
    target, headers = presigned(sandbox, "a.bin")

    def statuses() -> list[int]:
        sandbox.faults.clear()
        sandbox.faults.add(Fault(method="GET", status=500, rate=0.3, seed=42))
        return [requests.get(target, headers=headers, timeout=10).status_code for _ in range(20)]

    first = statuses()
    expected = random.Random(42)
    assert first == [500 if expected.random() < 0.3 else 200 for _ in range(20)]
    assert {200, 500} <= set(first)
    assert statuses() == first


@pytest.mark.slow  # the SDK waits a second before its retry
def test_faults_are_set_over_http_on_any_host(sandbox: Sandbox, client: Any) -> None:
    url = sandbox.url + FAULTS_PATH
    submit = {"kind": "CI submit", "status": 503, "code": "SlowDown", "times": 2}
    answer = requests.post(url, json=submit, timeout=10)
    assert answer.status_code == 200
    assert answer.json()["faults"] == [asdict(Fault.from_dict(submit)) | {"fired": 0}]
    bucket_host = {"Host": f"{BUCKET}.cos.{REGION}.myqcloud.com"}
    both = [{"method": "get", "path": "/b/*", "status": 404}, {"kind": "object PUT", "delay": 0.01}]
    assert requests.post(url, json=both, headers=bucket_host, timeout=10).status_code == 200

    error = service_error(client.ci_create_media_jobs, Bucket=BUCKET, Jobs=noise_reduction("in.wav", "out.wav"))
    assert (error.get_status_code(), error.get_error_code()) == (503, "SlowDown")
    client.put_object(Bucket=BUCKET, Key="a/x", Body=b"a")
    client.put_object(Bucket=BUCKET, Key="b/x", Body=b"b")
    assert read_object(client, "a/x") == b"a"
    assert service_error(client.get_object, Bucket=BUCKET, Key="b/x").get_status_code() == 404
    listed = requests.get(url, timeout=10).json()["faults"]
    assert [(f["path"], f["kind"], f["fired"]) for f in listed] == [("/b/*", None, 1), (None, "object PUT", 2)]

    for bad, field in [({"kind": "object POST", "status": 503}, "kind"), ({"times": True, "delay": 1}, "times")]:
        refused = requests.post(url, json=bad, timeout=10)
        assert refused.status_code == 400
        assert refused.json()["error"].startswith(field)
    assert requests.post(url, json={"kind": "CI describe"}, timeout=10).json()["error"].startswith("a fault needs")
    assert requests.delete(url, timeout=10).json() == {"faults": []}
    assert read_object(client, "b/x") == b"b"


# --- test audio ----------------------------------------------------------------------------


def test_noisy_wav_is_deterministic_16_bit_mono(tmp_path: Path) -> None:
    first = noisy_wav(tmp_path / "a.wav", 2.5, sample_rate=22050)
    second = noisy_wav(tmp_path / "b.wav", 2.5, sample_rate=22050)

    with wave.open(str(first)) as audio:
        assert (audio.getnchannels(), audio.getsampwidth(), audio.getframerate()) == (1, 2, 22050)
        assert audio.getnframes() == 55125
    assert first.read_bytes() == second.read_bytes()


# --- CI jobs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("callback_format", "content_type"), [("JSON", "application/json"), ("XML", "application/xml")]
)
def test_noise_reduction_job_calls_back(
    sandbox: Sandbox, client: Any, receiver: Receiver, tmp_path: Path, callback_format: str, content_type: str
) -> None:
    upload_noisy_wav(client, tmp_path, "in/noisy.wav", seconds=2.0)

    created = client.ci_create_media_jobs(
        Bucket=BUCKET, Jobs=noise_reduction("in/noisy.wav", "out/clean.wav", receiver.url + "callback", callback_format)
    )
    submitted = created["JobsDetail"][0]
    assert submitted["State"] == "Submitted"
    assert re.fullmatch(r"j[0-9a-f]{32}", submitted["JobId"])

    [sent] = sandbox.wait_for_callbacks(1, timeout=10)
    assert (sent.status_code, sent.attempts, sent.format) == (200, 1, callback_format.lower())
    assert [(r.path, r.headers["content-type"], r.body) for r in receiver.requests] == [
        ("/callback", content_type, sent.body)
    ]
    callback = parse_callback(sent.body)
    assert (callback.event_name, callback.body_format) == ("TaskFinish", callback_format.lower())
    [job] = callback.jobs
    assert (job.job_id, job.tag, job.state, job.code) == (submitted["JobId"], "NoiseReduction", "Success", "Success")
    assert (job.format, job.sample_rate, job.queue_type, job.user_data) == ("wav", "16000", "Speeching", "test run")
    assert job.input == ObjectLocation(BUCKET, REGION, "in/noisy.wav")
    assert job.output == ObjectLocation(BUCKET, REGION, "out/clean.wav")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+0800", job.end_time)
    with wave.open(io.BytesIO(read_object(client, "out/clean.wav"))) as audio:
        assert (audio.getnchannels(), audio.getsampwidth(), audio.getframerate()) == (1, 2, 16000)
        assert audio.getnframes() == 32000


@pytest.mark.parametrize(
    ("upload", "code"), [(None, "InputObjectNotExist"), (b"ID3 this is an mp3", "InvalidInputFile")]
)
def test_job_on_bad_input_fails_and_says_why(
    sandbox: Sandbox, client: Any, receiver: Receiver, upload: bytes | None, code: str
) -> None:
    if upload is not None:
        client.put_object(Bucket=BUCKET, Key="in/input.wav", Body=upload)

    client.ci_create_media_jobs(
        Bucket=BUCKET, Jobs=noise_reduction("in/input.wav", "out/x.wav", receiver.url + "callback", "JSON")
    )

    [sent] = sandbox.wait_for_callbacks(1, timeout=10)
    detail = json.loads(sent.body)["JobsDetail"]
    assert (detail["State"], detail["Code"]) == ("Failed", code)
    assert detail["Message"]
    assert service_error(client.head_object, Bucket=BUCKET, Key="out/x.wav").get_status_code() == 404


def test_unsupported_output_format_is_rejected(client: Any) -> None:
    error = service_error(
        client.ci_create_media_jobs, Bucket=BUCKET, Jobs=noise_reduction("a.wav", "b.mp3", audio_format="mp3")
    )

    assert (error.get_status_code(), error.get_error_code()) == (400, "InvalidArgument")


def test_describe_known_and_unknown_jobs(client: Any, tmp_path: Path) -> None:
    job_id = start_job(client, tmp_path)
    unknown = "j" + "0" * 32

    detail = wait_for_state(client, job_id, "Success")
    both = client.ci_get_media_jobs(Bucket=BUCKET, JobIDs=f"{job_id},{unknown}")
    alone = client.ci_get_media_jobs(Bucket=BUCKET, JobIDs=unknown)

    assert (detail["Tag"], detail["Input"]["Object"], detail["Operation"]["Output"]["Object"]) == (
        "NoiseReduction",
        "in.wav",
        "out.wav",
    )
    assert [d["JobId"] for d in both["JobsDetail"]] == [job_id]
    assert both["NonExistJobIds"] == unknown
    assert alone == {"NonExistJobIds": unknown}


def test_jobs_belong_to_their_bucket(client: Any, tmp_path: Path) -> None:
    job_id = start_job(client, tmp_path)

    assert client.ci_get_media_jobs(Bucket=OTHER_BUCKET, JobIDs=job_id)["NonExistJobIds"] == job_id


def test_ci_host_is_served_too(sandbox: Sandbox, client: Any, tmp_path: Path) -> None:
    # The SDK names the COS host even for CI calls when it is given an IP; tools that use the
    # documented CI host must work as well.
    job_id = start_job(client, tmp_path)
    path = f"/jobs/{job_id}"

    response = requests.get(
        sandbox.url + path,
        headers={"Host": f"{BUCKET}.ci.{REGION}.myqcloud.com"},
        auth=CosS3Auth(client.get_conf(), path),
        timeout=10,
    )

    assert response.status_code == 200
    assert response.headers["x-ci-request-id"]
    assert xmltodict.parse(response.content)["Response"]["JobsDetail"]["JobId"] == job_id


@pytest.mark.slow
def test_job_delay_reports_running_then_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    delay = 1.0
    with Sandbox(job_delay=delay).start() as slow, held_jobs(monkeypatch) as gate:
        slow_client = slow.client(REGION)
        job_id = start_job(slow_client, tmp_path)

        # Held after its delay, the job is Running for as long as this takes, however slow the machine.
        running = wait_for_state(slow_client, job_id, "Running", timeout=30)
        gate.wait_entered()
        gate.release()
        done = wait_for_state(slow_client, job_id, "Success", timeout=30)

    assert running["StartTime"] != "-"
    assert running["EndTime"] == "-"
    assert done["EndTime"] != "-"
    # The delay came before the work: the job reached its noise reduction no sooner than the delay
    # after it started (StartTime has whole seconds, cut down, so this holds for any start).
    assert gate.entered_at is not None
    assert gate.entered_at - datetime.strptime(running["StartTime"], "%Y-%m-%dT%H:%M:%S%z") >= timedelta(seconds=delay)


def test_failed_callback_is_retried(sandbox: Sandbox, client: Any, receiver: Receiver, tmp_path: Path) -> None:
    receiver.reply(Reply(503), Reply(503), Reply(200))

    start_job(client, tmp_path, receiver.url + "callback")

    [sent] = sandbox.wait_for_callbacks(1, timeout=10)
    assert (sent.status_code, sent.attempts) == (200, 3)
    assert [request.body for request in receiver.requests] == [sent.body] * 3


# --- the CLI entry point -------------------------------------------------------------------


def test_serve_prints_settings_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = f"import pathlib, webhook.dev.sandbox as s; s.serve('127.0.0.1', {port}, pathlib.Path({str(tmp_path)!r}))"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        banner = [process.stdout.readline() for _ in range(8)]
        client = make_client("sandbox-secret-id", "sandbox-secret-key", REGION, CosEndpoint("http", "127.0.0.1", port))
        client.put_object(Bucket=BUCKET, Key="a.txt", Body=b"x")
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    assert f"  WEBHOOK_COS_ENDPOINT=http://127.0.0.1:{port}\n" in banner
    assert (tmp_path / BUCKET).is_dir()


# --- the CI job list (DescribeMediaJobs) ---------------------------------------------------


def ci_time(seconds_from_now: float) -> str:
    """A time as DescribeMediaJobs takes it, in UTC (CI writes UTC+8, but any offset is a time)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(time.time() + seconds_from_now))


def list_jobs(client: Any, **query: Any) -> dict[str, Any]:
    answer: dict[str, Any] = client.ci_list_media_jobs(**({"Bucket": BUCKET, "Tag": "NoiseReduction"} | query))
    return answer


def listed_ids(client: Any, **query: Any) -> list[str]:
    return [detail["JobId"] for detail in list_jobs(client, **query).get("JobsDetail", [])]


def pages(client: Any, token: str = "", **query: Any) -> list[list[str]]:
    """Every page of the listing from ``token`` on, following NextToken until it is empty."""
    found: list[list[str]] = []
    while True:
        answer = list_jobs(client, NextToken=token, **query)
        found.append([detail["JobId"] for detail in answer.get("JobsDetail", [])])
        token = answer["NextToken"] or ""
        if not token:
            return found


def submit_quiet(client: Any, input_key: str, output_key: str) -> str:
    """Submit a job with no callback; its JobId."""
    response = client.ci_create_media_jobs(Bucket=BUCKET, Jobs=noise_reduction(input_key, output_key))
    job_id: str = response["JobsDetail"][0]["JobId"]
    return job_id


def finished_jobs(client: Any, tmp_path: Path, succeeded: int, failed: int = 0) -> list[str]:
    """Submit that many jobs (the failed ones lack their input), wait until all have finished; their ids in order."""
    upload_noisy_wav(client, tmp_path, "in.wav", seconds=0.2)
    ids = [submit_quiet(client, "in.wav", f"out/{n}.wav") for n in range(succeeded)]
    ids += [submit_quiet(client, "missing.wav", f"out/f{n}.wav") for n in range(failed)]
    deadline = time.monotonic() + 20
    while len(listed_ids(client, States="Success,Failed", Size=100)) < len(ids):
        assert time.monotonic() < deadline, "the jobs did not finish"
        time.sleep(0.05)
    return ids


def test_list_pages_through_every_job_by_next_token_in_creation_order(client: Any, tmp_path: Path) -> None:
    ids = finished_jobs(client, tmp_path, 7)

    assert pages(client, Size=3, OrderByTime="Asc") == [ids[0:3], ids[3:6], ids[6:]]
    assert pages(client, Size=3) == [ids[:3:-1], ids[3:0:-1], ids[:1]]  # Desc, newest first, is the default
    assert pages(client, Size=7, OrderByTime="Asc") == [ids]
    assert listed_ids(client) == ids[::-1]  # ten at most by default
    assert listed_ids(client, Size=5) == ids[:1:-1]


def test_list_a_job_submitted_between_pages_neither_shifts_nor_repeats_them(client: Any, tmp_path: Path) -> None:
    ids = finished_jobs(client, tmp_path, 5)
    first = list_jobs(client, Size=2)

    newer = submit_quiet(client, "in.wav", "out/newer.wav")
    rest = pages(client, first["NextToken"], Size=2)

    assert [d["JobId"] for d in first["JobsDetail"]] + [job_id for page in rest for job_id in page] == ids[::-1]
    assert listed_ids(client, Size=1) == [newer]


def test_list_filters_by_state_tag_queue_and_creation_time(client: Any, tmp_path: Path) -> None:
    ids = finished_jobs(client, tmp_path, 3, failed=1)
    succeeded, failed = ids[:3], ids[3:]
    queue_id = client.ci_get_media_jobs(Bucket=BUCKET, JobIDs=ids[0])["JobsDetail"][0]["QueueId"]

    assert listed_ids(client, States="Success", OrderByTime="Asc") == succeeded
    assert listed_ids(client, States="Failed") == failed
    assert listed_ids(client, States="Success,Failed,Cancel", OrderByTime="Asc") == ids
    assert listed_ids(client, States="Submitted,Running") == []
    assert listed_ids(client, Tag="VoiceSeparate") == []
    assert listed_ids(client, QueueId=queue_id, OrderByTime="Asc") == ids
    assert listed_ids(client, QueueId="p" + "0" * 32) == []
    assert listed_ids(client, StartCreationTime=ci_time(-300), OrderByTime="Asc") == ids
    assert listed_ids(client, StartCreationTime=ci_time(-300), EndCreationTime=ci_time(300), OrderByTime="Asc") == ids
    assert listed_ids(client, StartCreationTime=ci_time(300)) == []
    assert listed_ids(client, EndCreationTime=ci_time(-300)) == []
    assert list_jobs(client, Bucket=OTHER_BUCKET) == {"NextToken": None}


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ({"Size": 101}, "size must be a whole number from 1 to 100"),
        ({"Size": 0}, "size must be"),
        ({"States": "Success,Done"}, "'Done': not a job state"),
        ({"StartCreationTime": "2024-05-01 10:00:00"}, "startCreationTime must be written like"),
        ({"EndCreationTime": "2024-05-01T10:00:00Z"}, "endCreationTime must be written like"),
        ({"StartCreationTime": "2024-13-01T10:00:00+0800"}, "is not a valid time"),
        ({"OrderByTime": "Sideways"}, "orderByTime must be Desc or Asc"),
        ({"NextToken": "not-a-token"}, "nextToken is not one this API returned"),
        ({"NextToken": "000000ff"}, "nextToken is not one this API returned"),
        ({"Tag": ""}, "tag is required"),
    ],
)
def test_list_refuses_a_bad_query_with_invalid_argument(client: Any, query: dict[str, Any], says: str) -> None:
    error = service_error(list_jobs, client=client, **query)

    assert (error.get_status_code(), error.get_error_code()) == (400, "InvalidArgument")
    assert says in error.get_error_msg()


def test_list_is_signature_checked_and_can_be_faulted(sandbox: Sandbox, client: Any) -> None:
    wrong_key = make_client(sandbox.secret_id, "not-the-key", REGION, sandbox.endpoint)
    error = service_error(list_jobs, client=wrong_key)
    assert (error.get_status_code(), error.get_error_code()) == (403, "SignatureDoesNotMatch")

    sandbox.faults.add(Fault(kind="CI list", status=429, times=1))  # not a 5xx, which the SDK would retry
    assert service_error(list_jobs, client=client).get_error_code() == "TooManyRequests"
    assert listed_ids(client) == []


@pytest.mark.slow  # the SDK retries a 501 after a second
def test_list_refuses_an_unsupported_parameter_rather_than_ignore_it(client: Any) -> None:
    # The SDK sends its response* keyword arguments as URL parameters.
    error = service_error(list_jobs, client=client, ResponseContentType="text/plain")

    assert (error.get_status_code(), error.get_error_code()) == (501, "NotImplemented")


# --- What CI reports beyond what was submitted -------------------------------------------


def test_a_template_output_is_written_resolved_and_reported_as_submitted(client: Any, tmp_path: Path) -> None:
    upload_noisy_wav(client, tmp_path, "calls/day1/raw take.wav", seconds=2.0)
    jobs = noise_reduction("calls/day1/raw take.wav", "clean/${InputPath}/${InputName}-${Number}.${ext}")
    job_id = client.ci_create_media_jobs(Bucket=BUCKET, Jobs=jobs)["JobsDetail"][0]["JobId"]

    detail = wait_for_state(client, job_id, "Success")

    written = "clean/calls/day1/raw take-0.wav"
    data = read_object(client, written)
    operation = detail["Operation"]
    assert operation["Output"]["Object"] == "clean/${InputPath}/${InputName}-${Number}.${ext}"
    output_file = operation["MediaResult"]["OutputFile"]
    assert (output_file["Bucket"], output_file["Region"], output_file["ObjectName"]) == (BUCKET, REGION, written)
    assert output_file["Md5Info"] == {"Md5": hashlib.md5(data).hexdigest(), "ObjectName": written}
    assert detail["Progress"] == "100"
    with wave.open(io.BytesIO(data)) as audio:
        assert operation["MediaInfo"]["Stream"]["Audio"]["SampleRate"] == str(audio.getframerate()) == "16000"
        assert operation["MediaInfo"]["Stream"]["Audio"]["Channel"] == str(audio.getnchannels())
    assert operation["MediaInfo"]["Format"]["Size"] == str(len(data))
    assert operation["MediaInfo"]["Format"]["Duration"] == "2.000000"


def test_the_name_with_extension_placeholder(client: Any, tmp_path: Path) -> None:
    upload_noisy_wav(client, tmp_path, "in/a.wav")
    jobs = noise_reduction("in/a.wav", "out/${InputNameAndExt}.denoised.${ext}")
    job_id = client.ci_create_media_jobs(Bucket=BUCKET, Jobs=jobs)["JobsDetail"][0]["JobId"]

    detail = wait_for_state(client, job_id, "Success")

    assert detail["Operation"]["MediaResult"]["OutputFile"]["ObjectName"] == "out/a.wav.denoised.wav"
    assert read_object(client, "out/a.wav.denoised.wav")


@pytest.mark.parametrize("callback_format", ["JSON", "XML"])
def test_a_numbered_output_in_parts_is_written_and_reported_part_by_part(
    sandbox: Sandbox, client: Any, receiver: Receiver, tmp_path: Path, callback_format: str
) -> None:
    sandbox.output_parts = 2
    upload_noisy_wav(client, tmp_path, "in/a.wav", seconds=1.0)
    whole = noise_reduction("in/a.wav", "out/${InputName}.${ext}", receiver.url + "callback", callback_format)
    parted = noise_reduction(
        "in/a.wav", "out/${InputName}-${Number}.${ext}", receiver.url + "callback", callback_format
    )
    whole_id, parted_id = (
        client.ci_create_media_jobs(Bucket=BUCKET, Jobs=j)["JobsDetail"][0]["JobId"] for j in (whole, parted)
    )

    detail = wait_for_state(client, parted_id, "Success")
    wait_for_state(client, whole_id, "Success")  # without ${Number}: one object, as ever

    names = ["out/a-1.wav", "out/a-2.wav"]
    parts = [read_object(client, name) for name in names]
    output_file = detail["Operation"]["MediaResult"]["OutputFile"]
    assert output_file["ObjectName"] == names
    assert output_file["Md5Info"] == [
        {"Md5": hashlib.md5(data).hexdigest(), "ObjectName": name} for name, data in zip(names, parts, strict=True)
    ]
    # Each part is a WAV of its own; together they are the output the job writes whole.
    frames = []
    for data in parts:
        with wave.open(io.BytesIO(data)) as audio:
            assert audio.getnframes() > 0
            frames.append(audio.readframes(audio.getnframes()))
    with wave.open(io.BytesIO(read_object(client, "out/a.wav"))) as audio:
        assert b"".join(frames) == audio.readframes(audio.getnframes())
    # The callback names both, and cos-webhook reads them as CI's several files.
    sent = next(c for c in sandbox.wait_for_callbacks(2, timeout=10) if c.job_id == parted_id)
    (job,) = parse_callback(sent.body).jobs
    (written,) = job.output_files
    assert written.object_names == tuple(names)
    assert [d.md5 for d in written.digests] == [hashlib.md5(data).hexdigest() for data in parts]


def test_the_number_of_parts_is_at_least_one(sandbox: Sandbox) -> None:
    with pytest.raises(ValueError, match="at least one"):
        sandbox.output_parts = 0


@pytest.mark.parametrize(
    ("shape", "input_", "output"),
    [
        (CallbackShape.FULL, {"BucketId": BUCKET, "Region": REGION}, {"Bucket": BUCKET, "Region": REGION}),
        (CallbackShape.EMPTY_BUCKETS, {"BucketId": None, "Region": REGION}, {"Bucket": None, "Region": REGION}),
        (CallbackShape.OBJECT_ONLY, {}, {}),
    ],
)
def test_callbacks_state_locations_as_the_shape_says(
    sandbox: Sandbox, client: Any, receiver: Receiver, tmp_path: Path, shape: CallbackShape, input_: Any, output: Any
) -> None:
    sandbox.callback_shape = shape
    job_id = start_job(client, tmp_path, receiver.url + "callback")
    (sent,) = sandbox.wait_for_callbacks(1, timeout=10)

    detail = xmltodict.parse(sent.body)["Response"]["JobsDetail"]
    assert detail["JobId"] == job_id
    assert detail["Input"] == {**input_, "Object": "in.wav"}
    assert detail["Operation"]["Output"] == {**output, "Object": "out.wav"}
    assert detail["Operation"]["MediaResult"]["OutputFile"]["ObjectName"] == "out.wav"
    assert b"<Message/>" in sent.body  # empty elements as CI writes them
    # DescribeMediaJob states everything, whatever the callback left out.
    described = client.ci_get_media_jobs(Bucket=BUCKET, JobIDs=job_id)["JobsDetail"][0]
    assert described["Input"]["BucketId"] == BUCKET
