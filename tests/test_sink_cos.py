"""CosSink with the real SDK against the sandbox: upload, server-side copy, order, CRC64, errors, presigning."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import requests
from support.pipeline import Pipeline

from webhook.ci.crc64 import crc64ecma
from webhook.dev.sandbox import Sandbox
from webhook.errors import ConfigError
from webhook.models import Event, FetchedFile, Job, ObjectLocation
from webhook.sinks import DeliveryError, Sink
from webhook.sinks.cos import CosSink
from webhook.sinks.events import build_event, event_document
from webhook.sinks.options import CosOptions
from webhook.worker.runtime import Worker

SOURCE, DEST = "audio-1250000000", "archive-1250000000"
REGION, OTHER_REGION = "ap-guangzhou", "ap-shanghai"
OUTPUT_KEY = "out/meeting.wav"
AUDIO = bytes(range(256)) * 4096 + b"tail"
USER_DATA = "订单 42 / ok?"  # non-ASCII, a space and punctuation: all must survive the header
AUDIO_KEY, JSON_KEY = "denoised/j1.wav", "denoised/j1.event.json"


def make_sink(sandbox: Sandbox, secret_key: str | None = None, **options: Any) -> CosSink:
    return CosSink(
        "archive",
        CosOptions(**{"bucket": DEST, "region": REGION, "prefix": "denoised/", **options}),
        secret_id=sandbox.secret_id,
        secret_key=secret_key or sandbox.secret_key,
        default_endpoint=sandbox.endpoint,
    )


def succeeded(
    sandbox: Sandbox, tmp_path: Path, *, downloaded: bool, crc64: str | None = None, output_key: str = OUTPUT_KEY
) -> Event:
    """A succeeded job whose output is in the sandbox; its file downloaded to disk or only described."""
    sandbox.client(REGION).put_object(Bucket=SOURCE, Key=output_key, Body=AUDIO, ContentType="audio/wav")
    path = tmp_path / "download.part"
    path.write_bytes(AUDIO)
    job = Job(
        job_id="j1",
        tag="NoiseReduction",
        state="Success",
        output=ObjectLocation(SOURCE, REGION, output_key),
        user_data=USER_DATA,
    )
    crc = crc64 or str(crc64ecma(AUDIO))
    fetched = FetchedFile(str(path) if downloaded else None, len(AUDIO), crc, "audio/wav")
    return build_event(job, "archive", fetched)


def failed() -> Event:
    job = Job(job_id="j1", tag="NoiseReduction", state="Failed", code="InvalidInputFile", message="bad audio")
    return build_event(job, "archive", None)


def read(sandbox: Sandbox, key: str) -> tuple[bytes, dict[str, str]]:
    response = sandbox.client(REGION).get_object(Bucket=DEST, Key=key)
    return response["Body"].get_raw_stream().read(), response


def writes(caplog: pytest.LogCaptureFixture, verbs: str = "put|copy") -> list[tuple[str, str]]:
    """(verb, key) for every object call the SDK made with one of ``verbs``, in order (from its own log)."""
    pattern = re.compile(rf"({verbs}) object, url=:https?://[^/]+/(\S+) ,")
    return [m.groups() for r in caplog.records if (m := pattern.match(r.getMessage()))]


@pytest.fixture(autouse=True)
def _sdk_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="qcloud_cos.cos_client")


@pytest.mark.parametrize(("region", "server_side_copy"), [(OTHER_REGION, True), (REGION, False)])
def test_uploads_the_downloaded_file_then_the_json(
    sandbox: Sandbox, tmp_path: Path, caplog: pytest.LogCaptureFixture, region: str, server_side_copy: bool
) -> None:
    sink: Sink = make_sink(sandbox, region=region, server_side_copy=server_side_copy)
    event = succeeded(sandbox, tmp_path, downloaded=True)
    assert sink.needs_bytes(event.job)
    caplog.clear()  # only the sink's own writes from here

    sink.deliver(event)

    assert writes(caplog) == [("put", AUDIO_KEY), ("put", JSON_KEY)]
    audio, headers = read(sandbox, AUDIO_KEY)
    assert audio == AUDIO
    assert headers["Content-Type"] == "audio/wav"
    assert headers["x-cos-meta-job-id"] == "j1"
    assert headers["x-cos-meta-event-id"] == event.event_id
    assert headers["x-cos-meta-user-data"].isascii()
    assert unquote(headers["x-cos-meta-user-data"]) == USER_DATA
    document, json_headers = read(sandbox, JSON_KEY)
    assert json.loads(document) == event_document(event, [AUDIO_KEY])
    assert json_headers["Content-Type"] == "application/json"
    assert json_headers["x-cos-meta-event-id"] == event.event_id


def test_same_region_is_copied_by_cos_without_the_bytes(
    sandbox: Sandbox, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = make_sink(sandbox)
    event = succeeded(sandbox, tmp_path, downloaded=False)
    assert not sink.needs_bytes(event.job)
    assert event.file is not None
    assert event.file.path is None  # nothing on disk to upload: only COS can have made the copy
    caplog.clear()  # only the sink's own writes from here

    sink.deliver(event)

    assert writes(caplog) == [("copy", AUDIO_KEY), ("put", JSON_KEY)]
    audio, headers = read(sandbox, AUDIO_KEY)
    assert audio == AUDIO
    assert headers["Content-Type"] == "audio/wav"
    assert (headers["x-cos-meta-job-id"], headers["x-cos-meta-event-id"]) == ("j1", event.event_id)
    assert unquote(headers["x-cos-meta-user-data"]) == USER_DATA
    assert json.loads(read(sandbox, JSON_KEY)[0]) == event_document(event, [AUDIO_KEY])


@pytest.mark.parametrize(("downloaded", "verb"), [(True, "put"), (False, "copy")], ids=["upload", "copy"])
def test_output_key_ending_in_json_keeps_audio_and_document_apart(
    sandbox: Sandbox, tmp_path: Path, caplog: pytest.LogCaptureFixture, downloaded: bool, verb: str
) -> None:
    sink = make_sink(sandbox, server_side_copy=not downloaded)
    event = succeeded(sandbox, tmp_path, downloaded=downloaded, output_key="out/meeting.json")
    caplog.clear()  # only the sink's own writes from here

    sink.deliver(event)

    assert writes(caplog) == [(verb, "denoised/j1.json"), ("put", JSON_KEY)]
    audio, headers = read(sandbox, "denoised/j1.json")
    assert audio == sandbox.object_path(SOURCE, "out/meeting.json").read_bytes()
    assert headers["Content-Type"] == "audio/wav"
    assert json.loads(read(sandbox, JSON_KEY)[0]) == event_document(event, ["denoised/j1.json"])
    location = sink.location(event.job)
    assert location is not None
    assert location.key == "denoised/j1.json"


def test_failed_job_gets_only_the_json(sandbox: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    event = failed()

    make_sink(sandbox).deliver(event)

    assert writes(caplog) == [("put", JSON_KEY)]
    assert json.loads(read(sandbox, JSON_KEY)[0]) == event_document(event)


@pytest.mark.parametrize("downloaded", [True, False], ids=["upload", "copy"])
def test_redelivery_overwrites_the_same_two_objects(sandbox: Sandbox, tmp_path: Path, downloaded: bool) -> None:
    sink = make_sink(sandbox)
    sink.deliver(failed())  # an earlier, different document under the same key
    event = succeeded(sandbox, tmp_path, downloaded=downloaded)

    sink.deliver(event)
    sink.deliver(event)

    bucket_dir = sandbox.object_path(DEST, AUDIO_KEY).parent
    assert len(list(bucket_dir.iterdir())) == 4  # two objects, each its bytes and its metadata
    assert read(sandbox, AUDIO_KEY)[0] == AUDIO
    assert json.loads(read(sandbox, JSON_KEY)[0]) == event_document(event, [AUDIO_KEY])


@pytest.mark.parametrize("downloaded", [True, False], ids=["upload", "copy"])
def test_crc64_mismatch_is_retried_and_writes_no_json(sandbox: Sandbox, tmp_path: Path, downloaded: bool) -> None:
    event = succeeded(sandbox, tmp_path, downloaded=downloaded, crc64="12345")

    with pytest.raises(DeliveryError) as info:
        make_sink(sandbox).deliver(event)

    assert not info.value.permanent
    assert f"has CRC64 {crc64ecma(AUDIO)}, expected 12345" in info.value.message
    assert not sandbox.object_path(DEST, JSON_KEY).exists()


def test_long_user_data_is_left_to_the_json(sandbox: Sandbox, tmp_path: Path) -> None:
    event = succeeded(sandbox, tmp_path, downloaded=False)
    event = build_event(replace(event.job, user_data="数" * 400), "archive", event.file)

    make_sink(sandbox).deliver(event)

    assert "x-cos-meta-user-data" not in read(sandbox, AUDIO_KEY)[1]
    assert json.loads(read(sandbox, JSON_KEY)[0])["job"]["user_data"] == "数" * 400


@pytest.mark.parametrize(
    ("secret_id", "secret_key", "code"),
    [
        (None, "not-the-sandbox-key-0123456789", "SignatureDoesNotMatch"),
        ("someone-else", None, "InvalidAccessKeyId"),
    ],
)
def test_wrong_credentials_are_permanent_and_never_echoed(
    sandbox: Sandbox, tmp_path: Path, secret_id: str | None, secret_key: str | None, code: str
) -> None:
    sink = CosSink(
        "archive",
        CosOptions(bucket=DEST, region=OTHER_REGION),
        secret_id=secret_id or sandbox.secret_id,
        secret_key=secret_key or sandbox.secret_key,
        default_endpoint=sandbox.endpoint,
    )

    with pytest.raises(DeliveryError) as info:
        sink.deliver(succeeded(sandbox, tmp_path, downloaded=True))

    assert info.value.permanent
    assert info.value.message.startswith(f"archive: put_object cos://{DEST}/j1.wav: HTTP 403 {code}")
    assert (secret_key or sandbox.secret_key) not in info.value.message


def test_missing_bucket_and_missing_source_are_permanent(sandbox: Sandbox, tmp_path: Path) -> None:
    event = succeeded(sandbox, tmp_path, downloaded=False)

    with pytest.raises(DeliveryError) as no_bucket:
        make_sink(sandbox, bucket="archive-1250000001").deliver(event)
    sandbox.client(REGION).delete_object(Bucket=SOURCE, Key=OUTPUT_KEY)
    with pytest.raises(DeliveryError) as no_source:
        make_sink(sandbox).deliver(event)

    assert no_bucket.value.permanent
    assert "copy_object cos://archive-1250000001/denoised/j1.wav: HTTP 404 NoSuchBucket" in no_bucket.value.message
    assert no_source.value.permanent
    assert "HTTP 404 NoSuchKey" in no_source.value.message


def test_check_heads_the_bucket(sandbox: Sandbox) -> None:
    assert make_sink(sandbox).check() == "reachable"
    assert make_sink(sandbox).target() == f"cos://{DEST}/denoised/ ({REGION})"

    with pytest.raises(DeliveryError) as info:
        make_sink(sandbox, bucket="archive-1250000001").check()

    assert info.value.permanent
    assert "head_bucket cos://archive-1250000001/: HTTP 404" in info.value.message


def test_endpoint_option_overrides_the_default(sandbox: Sandbox) -> None:
    sink = CosSink(
        "archive",
        CosOptions(bucket=DEST, region=REGION, endpoint=sandbox.url + "/"),
        secret_id=sandbox.secret_id,
        secret_key=sandbox.secret_key,
        default_endpoint=None,  # would be the public endpoint
    )

    assert sink.check() == "reachable"
    assert sink.target() == f"cos://{DEST}/ ({REGION}) at {sandbox.url}/"
    with pytest.raises(ConfigError, match=r"^sink archive: options\.endpoint has an invalid port$"):
        CosSink(
            "archive",
            CosOptions(bucket=DEST, region=REGION, endpoint="http://127.0.0.1:99999"),
            secret_id="id",
            secret_key="key",
            default_endpoint=None,
        )


def test_location_with_a_presigned_url_that_downloads_the_audio(sandbox: Sandbox, tmp_path: Path) -> None:
    sink = make_sink(sandbox)
    event = succeeded(sandbox, tmp_path, downloaded=False)
    sink.deliver(event)

    plain = sink.location(event.job)
    signed = sink.location(event.job, presign_seconds=60)

    assert plain is not None
    assert (plain.kind, plain.bucket, plain.key, plain.region, plain.url) == ("cos", DEST, AUDIO_KEY, REGION, "")
    assert signed is not None
    assert signed.url.startswith(f"https://{DEST}.cos.{REGION}.myqcloud.com/{AUDIO_KEY}?q-sign-algorithm=sha1&")
    target, headers = sandbox.request_target(signed.url)
    response = requests.get(target, headers=headers, timeout=10)
    assert response.status_code == 200
    assert response.content == AUDIO
    assert sink.location(failed().job, presign_seconds=60) is None


@pytest.mark.parametrize(("region", "downloads"), [(REGION, []), (OTHER_REGION, [("get", "out/denoised.wav")])])
def test_callback_through_the_worker_to_the_bucket(
    pipeline: Pipeline,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    region: str,
    downloads: list[tuple[str, str]],
) -> None:
    config = tmp_path / "cos-webhook.toml"
    config.write_text(
        f'[[sinks]]\nname = "archive"\ntype = "cos"\n'
        f'[sinks.options]\nbucket = "{DEST}"\nregion = "{region}"\nprefix = "denoised/"\n'
    )
    monkeypatch.setenv("COS_SECRET_ID", pipeline.sandbox.secret_id)
    monkeypatch.setenv("COS_SECRET_KEY", pipeline.sandbox.secret_key)
    settings = pipeline.settings.replace(sink_dir="", http_sink_url="", config_path=str(config))
    job_id = pipeline.submit(pipeline.upload_input())
    pipeline.sandbox.wait_for_callbacks(1, timeout=20)

    assert pipeline.drain(Worker.from_settings(settings, pipeline.ledger), job_id, {"delivered", "dead"}) == "delivered"

    # Same region: COS copied the output itself and the worker never downloaded it.
    assert writes(caplog, "get") == downloads
    audio, headers = read(pipeline.sandbox, f"denoised/{job_id}.wav")
    assert audio == pipeline.output_bytes()
    assert headers["x-cos-meta-job-id"] == job_id
    document = json.loads(read(pipeline.sandbox, f"denoised/{job_id}.event.json")[0])
    assert (document["type"], document["file"]["size"]) == ("job.succeeded", len(audio))
