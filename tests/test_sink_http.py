"""The http sink against a real local receiver: signatures, JSON and multipart bodies, status handling, big files."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from importlib.metadata import version
from pathlib import Path
from typing import IO

import pytest
from standardwebhooks.webhooks import Webhook
from support.receiver import ReceivedRequest, Receiver, Reply
from support.trickle import Trickle
from werkzeug.datastructures import FileStorage

from webhook.deadline import expire_all
from webhook.models import Event, FetchedFile, FileLocation, Job, JobFile, ObjectLocation
from webhook.sinks import BuildContext, DeliveryError, NotificationSink
from webhook.sinks.build import build_sink
from webhook.sinks.events import build_event, event_document
from webhook.sinks.http import HttpMultipartSink, HttpNotifySink
from webhook.sinks.options import HttpOptions

KEY = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(KEY).decode()
MiB = 1024 * 1024


def succeeded(tmp_path: Path, content: bytes = b"", *, size: int = 0, key: str = "out/a.wav") -> Event:
    """A succeeded event whose file holds ``content``, or ``size`` random bytes written 1 MiB at a time."""
    source = tmp_path / "fetched.wav"
    with source.open("wb") as out:
        out.write(content)
        for _ in range(size // MiB):
            out.write(hashlib.shake_256(out.tell().to_bytes(8, "big")).digest(MiB))
    job = Job(job_id="job-1", tag="NoiseReduction", state="Success", output=ObjectLocation("b-1250000000", "r", key))
    fetched = FetchedFile(path=str(source), size=source.stat().st_size, crc64="1", content_type="audio/wav")
    return build_event(job, "http", fetched)


def failed() -> Event:
    job = Job(job_id="job-2", tag="NoiseReduction", state="Failed", code="InvalidInput", message="bad audio")
    return build_event(job, "http", None)


def signature_of(request: ReceivedRequest, key: bytes) -> str:
    """Standard Webhooks v1 signature computed independently and streamed, for bodies too big to hold."""
    mac = hmac.new(key, f"{request.headers['webhook-id']}.{request.headers['webhook-timestamp']}.".encode(), "sha256")
    with request.open_body() as body:
        for chunk in iter(lambda: body.read(MiB), b""):
            mac.update(chunk)
    return "v1," + base64.b64encode(mac.digest()).decode()


def sha256_of(stream: IO[bytes], *, base64_encoded: bool = False) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(4 * MiB), b""):  # 4 MiB of base64 decodes on its own
        digest.update(base64.b64decode(chunk) if base64_encoded else chunk)
    return digest.hexdigest()


def file_bytes(part: FileStorage) -> bytes:
    """The audio, decoded from the part's base64 transfer encoding."""
    assert part.headers["Content-Transfer-Encoding"] == "base64"
    return base64.b64decode(part.read())


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as running:
        yield running


@pytest.fixture
def sink(receiver: Receiver) -> Iterator[HttpMultipartSink]:
    http = HttpMultipartSink(receiver.url + "hook?token=query-secret", SECRET, timeout=5)
    yield http
    http.close()


def deliver_error(sink: HttpMultipartSink, event: Event) -> DeliveryError:
    with pytest.raises(DeliveryError) as caught:
        sink.deliver(event)
    return caught.value


def test_signature_verifies_with_standardwebhooks(tmp_path: Path, receiver: Receiver, sink: HttpMultipartSink) -> None:
    # Binary audio: the reference library reads the body as UTF-8, which the base64 file part allows.
    sink.deliver(succeeded(tmp_path, bytes(range(256)) * 100))
    sink.deliver(failed())
    for request in receiver.requests:
        assert request.body is not None
        Webhook(SECRET).verify(request.body, request.headers, json_parse=False)


def test_raw_secret_is_used_as_utf8_bytes(receiver: Receiver) -> None:
    raw = "not-base64: ünïcode secret"
    http = HttpMultipartSink(receiver.url, raw)
    http.deliver(failed())
    http.close()
    (request,) = receiver.requests
    assert request.body is not None
    Webhook(raw.encode()).verify(request.body, request.headers, json_parse=False)


def test_headers(tmp_path: Path, receiver: Receiver, sink: HttpMultipartSink) -> None:
    event = succeeded(tmp_path, b"x" * 1000)
    sink.deliver(event)
    sink.deliver(event)
    first, second = receiver.requests
    assert first.method == "POST"
    assert first.path == "/hook"
    assert first.headers["webhook-id"] == first.headers["idempotency-key"] == event.event_id
    assert second.headers["webhook-id"] == event.event_id  # a redelivery keeps its idempotency key
    assert abs(int(first.headers["webhook-timestamp"]) - time.time()) < 5
    assert first.headers["user-agent"] == f"cos-webhook/{version('cos-webhook')}"
    assert int(first.headers["content-length"]) == first.size
    assert "transfer-encoding" not in first.headers
    assert first.headers["content-type"].startswith("multipart/form-data; boundary=")


def test_parts_carry_metadata_and_exact_file_bytes(tmp_path: Path, receiver: Receiver, sink: HttpMultipartSink) -> None:
    audio = bytes(range(256)) * 5000 + b"\r\n--not-a-boundary--\r\n"  # binary, with CRLFs and dashes
    event = succeeded(tmp_path, audio)
    sink.deliver(event)
    (request,) = receiver.requests
    with request.open_body() as body:
        Webhook(SECRET).verify(body.read(), request.headers, json_parse=False)
    form, files = request.form()
    assert list(form) == ["metadata"]
    assert json.loads(form["metadata"]) == event_document(event)
    assert list(files) == ["file"]
    assert files["file"].filename == "a.wav"
    assert files["file"].mimetype == "audio/wav"
    assert file_bytes(files["file"]) == audio


def test_each_file_of_a_job_is_a_part_of_its_own_in_the_document_s_order(
    tmp_path: Path, receiver: Receiver, sink: HttpMultipartSink
) -> None:
    contents = [bytes(range(256)) * 300 + b"\r\n--x", b"second", b"third part, of yet another length"]
    files = []
    for number, content in enumerate(contents, start=1):
        path = tmp_path / f"part-{number}.staged"
        path.write_bytes(content)
        fetched = FetchedFile(path=str(path), size=len(content), crc64="1", content_type="audio/wav")
        files.append(JobFile(ObjectLocation("b-1250000000", "r", f"out/a-{number}.wav"), fetched, number, 3))
    job = Job(job_id="job-1", tag="NoiseReduction", state="Success", output=files[0].source)
    event = build_event(job, "http", files)

    sink.deliver(event)

    (request,) = receiver.requests
    with request.open_body() as body:
        Webhook(SECRET).verify(body.read(), request.headers, json_parse=False)
    assert int(request.headers["content-length"]) == request.size  # the body's length was known exactly
    form, parts = request.form()
    assert json.loads(form["metadata"]) == event_document(event)
    assert list(parts) == ["file", "file.2", "file.3"]
    assert [parts[name].filename for name in parts] == ["a-1.wav", "a-2.wav", "a-3.wav"]
    assert [file_bytes(parts[name]) for name in parts] == contents


def test_failed_event_has_only_metadata(receiver: Receiver, sink: HttpMultipartSink) -> None:
    event = failed()
    sink.deliver(event)
    form, files = receiver.requests[0].form()
    assert files == {}
    assert json.loads(form["metadata"]) == event_document(event)


def test_awkward_file_name_cannot_break_the_part_headers(
    tmp_path: Path, receiver: Receiver, sink: HttpMultipartSink
) -> None:
    event = succeeded(tmp_path, b"audio", key='out/a"b\r\nContent-Type: text/html\r\n\r\nü.wav')
    sink.deliver(event)
    form, files = receiver.requests[0].form()
    assert json.loads(form["metadata"]) == event_document(event)
    assert list(files) == ["file"]
    assert files["file"].mimetype == "audio/wav"
    assert file_bytes(files["file"]) == b"audio"


def test_429_passes_on_retry_after(receiver: Receiver, sink: HttpMultipartSink) -> None:
    receiver.reply(Reply(429, retry_after="7"))
    error = deliver_error(sink, failed())
    assert error.retry_after == 7
    assert not error.permanent
    assert error.message.startswith("http: HTTP 429 Too Many Requests")


def test_retry_after_as_http_date(receiver: Receiver, sink: HttpMultipartSink) -> None:
    receiver.reply(Reply(503, retry_after=format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)))
    error = deliver_error(sink, failed())
    assert error.retry_after is not None
    assert 25 <= error.retry_after <= 30


@pytest.mark.parametrize("value", ["soon", "-5", "1.5", ""])
def test_unusable_retry_after_is_ignored(receiver: Receiver, sink: HttpMultipartSink, value: str) -> None:
    receiver.reply(Reply(503, retry_after=value))
    assert deliver_error(sink, failed()).retry_after is None


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 409, 425])
def test_retryable_statuses(receiver: Receiver, sink: HttpMultipartSink, status: int) -> None:
    receiver.reply(Reply(status, body=b"try later"))
    error = deliver_error(sink, failed())
    assert not error.permanent
    assert error.retry_after is None
    assert f"HTTP {status}" in error.message
    assert error.message.endswith(": try later")


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 413, 422, 301, 307])
def test_permanent_statuses(receiver: Receiver, sink: HttpMultipartSink, status: int) -> None:
    receiver.reply(Reply(status))
    error = deliver_error(sink, failed())
    assert error.permanent
    assert f"http: HTTP {status}" in error.message
    assert len(receiver.requests) == 1  # redirects are not followed


def test_recovers_after_a_failure(receiver: Receiver, sink: HttpMultipartSink) -> None:
    receiver.reply(Reply(503), Reply(204))
    deliver_error(sink, failed())
    sink.deliver(failed())
    assert len(receiver.requests) == 2


def test_timeout_is_retryable(receiver: Receiver) -> None:
    receiver.reply(Reply(200, delay=10))
    http = HttpMultipartSink(receiver.url, SECRET, timeout=0.5)
    started = time.monotonic()
    error = deliver_error(http, failed())
    http.close()
    assert time.monotonic() - started < 5
    assert not error.permanent
    assert error.message == "http: no complete answer within 0.5s (deadline)"


@pytest.mark.slow  # a deadline of a second runs out
def test_a_trickling_answer_passes_the_deadline() -> None:
    # One byte every 0.3 s never trips a per-read timeout of 1 s; the deadline of the whole POST does.
    with Trickle(every=0.3) as server:
        http = HttpMultipartSink(server.url, SECRET, timeout=1)
        error = deliver_error(http, failed())
        http.close()
    assert not error.permanent
    assert error.message == "http: no complete answer within 1s (deadline)"


@pytest.mark.slow  # a deadline of a second runs out
def test_a_status_line_then_trickling_headers_is_not_a_delivery() -> None:
    with Trickle(every=0.3, head=len(b"HTTP/1.1 200 OK\r\n")) as server:
        http = HttpMultipartSink(server.url, SECRET, timeout=1)
        error = deliver_error(http, failed())
        http.close()
    assert error.message == "http: no complete answer within 1s (deadline)"


@pytest.mark.slow  # a deadline of a second runs out
def test_a_receiver_that_never_answers_passes_the_deadline() -> None:
    with Trickle(answer=None) as server:
        http = HttpMultipartSink(server.url, SECRET, timeout=1)
        error = deliver_error(http, failed())
        http.close()
    assert not error.permanent
    assert error.message == "http: no complete answer within 1s (deadline)"


@pytest.mark.slow  # a deadline of a second runs out
def test_a_receiver_that_reads_the_upload_slowly_passes_the_deadline(tmp_path: Path) -> None:
    # Far more than socket buffers hold, at an allowed rate that leaves the upload no extra time.
    event = succeeded(tmp_path, size=16 * MiB)
    with Trickle(answer=None, read_every=0.1) as server:
        http = HttpMultipartSink(server.url, SECRET, timeout=1, min_rate=10**12)
        error = deliver_error(http, event)
        http.close()
    assert not error.permanent
    assert error.message == "http: no complete answer within 1s (deadline)"


@pytest.mark.slow  # a deadline of a second runs out
def test_the_upload_gets_its_time_at_the_minimum_rate(tmp_path: Path, receiver: Receiver) -> None:
    event = succeeded(tmp_path, b"x" * 1500)
    http = HttpMultipartSink(receiver.url, SECRET, timeout=0.2, min_rate=3000)
    receiver.reply(Reply(200, delay=10))
    error = deliver_error(http, event)
    http.close()
    found = re.fullmatch(r"http: no complete answer within ([0-9.]+)s \(deadline\)", error.message)
    assert found, error.message
    # 0.2 s plus the whole multipart body's time at 3000 bytes/s: more than the file's base64 alone.
    assert 0.2 + 2000 / 3000 < float(found.group(1)) < 2


def test_expire_all_abandons_a_delivery_stuck_on_a_trickling_receiver() -> None:
    errors: list[DeliveryError] = []

    def deliver() -> None:
        try:
            http.deliver(failed())
        except DeliveryError as exc:
            errors.append(exc)

    with Trickle(every=0.3) as server:
        http = HttpMultipartSink(server.url, SECRET, timeout=60)
        worker = threading.Thread(target=deliver, daemon=True)
        worker.start()
        server.wait_for_requests(1)
        expire_all("worker shutting down")
        worker.join(timeout=10)
        assert not worker.is_alive()
        http.close()
    assert [(error.message, error.permanent) for error in errors] == [("http: abandoned: worker shutting down", False)]


def test_connection_refused_is_retryable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    http = HttpMultipartSink(f"http://user:password@127.0.0.1:{port}/hook?token=query-secret", SECRET, timeout=2)
    error = deliver_error(http, failed())
    assert not error.permanent
    assert error.message == "http: request failed: Connection refused"


def test_missing_file_is_retryable(tmp_path: Path, sink: HttpMultipartSink) -> None:
    event = succeeded(tmp_path, b"audio")
    assert event.file is not None
    Path(event.file.path).unlink()
    error = deliver_error(sink, event)
    assert not error.permanent
    assert "cannot read" in error.message


def test_secret_never_appears_in_errors(receiver: Receiver, sink: HttpMultipartSink) -> None:
    encoded = SECRET.removeprefix("whsec_")
    replies = [
        Reply(400, body=f"bad signature for {SECRET}".encode()),
        Reply(401, body=encoded.encode()),
        Reply(500, body=b"oops"),
        Reply(429, retry_after="1"),
        Reply(200, delay=10),
    ]
    messages: list[str] = []
    http = HttpMultipartSink(receiver.url + "?token=query-secret", SECRET, timeout=0.5)
    for reply in replies:
        receiver.reply(reply)
        error = deliver_error(http, failed())
        messages += [error.message, str(error), repr(error)]
    http.close()
    assert any("[redacted]" in message for message in messages)
    for message in messages:
        assert encoded not in message
        assert KEY.decode("latin-1") not in message
        assert "query-secret" not in message


@pytest.mark.parametrize("secret", ["", "whsec_", "whsec_not base64!"])
def test_bad_secrets_are_refused_without_echo(secret: str) -> None:
    with pytest.raises(ValueError, match="HTTP sink secret") as caught:
        HttpMultipartSink("http://127.0.0.1:9/", secret)
    assert "base64!" not in str(caught.value)


@pytest.mark.slow
def test_large_file_is_streamed(tmp_path: Path) -> None:
    event = succeeded(tmp_path, size=50 * MiB)
    assert event.file is not None
    with open(event.file.path, "rb") as source:
        expected = sha256_of(source)
    with Receiver(memory_limit=MiB) as receiver:
        http = HttpMultipartSink(receiver.url, SECRET)
        tracemalloc.start()
        try:
            http.deliver(event)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        http.close()
        (request,) = receiver.requests
        assert request.body_path is not None  # spooled by the receiver, not kept in memory
        assert request.size == int(request.headers["content-length"]) > 50 * MiB * 4 // 3
        assert request.headers["webhook-signature"] == signature_of(request, KEY)
        _, files = request.form()
        with files["file"].stream as received:
            assert sha256_of(received, base64_encoded=True) == expected
    # Sender and receiver share this process; either holding the body would show as a 50 MiB peak.
    assert peak < 16 * MiB


# -- json mode ----------------------------------------------------------------------------------


@pytest.fixture
def notify(receiver: Receiver) -> Iterator[HttpNotifySink]:
    http = HttpNotifySink(receiver.url + "hook", SECRET, timeout=5)
    yield http
    http.close()


def located() -> Event:
    """A succeeded event as the worker hands it to a json-mode sink: described, not downloaded, and located."""
    output = ObjectLocation("b-1250000000", "ap-guangzhou", "out/a.wav")
    job = Job(job_id="job-3", tag="NoiseReduction", state="Success", output=output, user_data="订单 42 \u2028 ü")
    fetched = FetchedFile(path=None, size=123_456_789, crc64="1", content_type="audio/wav")
    where = FileLocation("source", output.bucket, output.key, output.region, url="https://b.example/out/a.wav?sig=1")
    return build_event(job, "http", fetched, where)


def test_json_mode_posts_the_document_alone(receiver: Receiver, notify: HttpNotifySink) -> None:
    event = located()
    notify.deliver(event)
    notify.deliver(failed())
    succeeded_request, failed_request = receiver.requests
    for request, sent in ((succeeded_request, event), (failed_request, failed())):
        assert request.body is not None
        assert request.headers["content-type"] == "application/json"
        assert int(request.headers["content-length"]) == request.size == len(request.body)
        assert request.headers["webhook-id"] == request.headers["idempotency-key"] == sent.event_id
        # The stock verifier checks the signature over the raw body and hands back the parsed document.
        assert Webhook(SECRET).verify(request.body, request.headers) == event_document(sent)
    assert json.loads(succeeded_request.body or b"")["file"]["location"] == {
        "kind": "source",
        "bucket": "b-1250000000",
        "key": "out/a.wav",
        "region": "ap-guangzhou",
        "url": "https://b.example/out/a.wav?sig=1",
    }


def test_json_mode_needs_no_bytes_and_shares_the_status_handling(receiver: Receiver, notify: HttpNotifySink) -> None:
    assert isinstance(notify, NotificationSink)
    assert not notify.needs_bytes(located().job)
    receiver.reply(Reply(503, retry_after="7", body=b"later"), Reply(400))
    retryable, permanent = deliver_error(notify, located()), deliver_error(notify, located())
    assert retryable.message == "http: HTTP 503 Service Unavailable: later"
    assert (retryable.retry_after, retryable.permanent) == (7, False)
    assert (permanent.message, permanent.permanent) == ("http: HTTP 400 Bad Request", True)


@pytest.mark.parametrize(
    ("mode", "sink_class"),
    [({}, HttpNotifySink), ({"mode": "json"}, HttpNotifySink), ({"mode": "multipart"}, HttpMultipartSink)],
    ids=["default", "json", "multipart"],
)
def test_mode_chooses_what_is_built(mode: dict[str, str], sink_class: type) -> None:
    options = HttpOptions.model_validate({"url": "http://127.0.0.1:9/", "secret_env": "HOOK"} | mode)
    built = build_sink("http", "hook", options, BuildContext({"HOOK": SECRET}))
    assert type(built) is sink_class
    assert built.needs_bytes(located().job) is (sink_class is HttpMultipartSink)
    built.close()


@pytest.mark.parametrize("extra", [{"presign_seconds": 60}, {"file_from": "archive"}])
def test_multipart_mode_refuses_location_options(extra: dict[str, object]) -> None:
    with pytest.raises(ValueError, match='file_from and presign_seconds need mode = "json"'):
        HttpOptions.model_validate({"url": "http://127.0.0.1:9/", "secret_env": "HOOK", "mode": "multipart"} | extra)


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, "receiver answered HEAD with 200"),
        (404, "receiver answered HEAD with 404"),  # reachable: the POST decides what a path means
        (405, "receiver is reachable but does not answer HEAD (405): POST was not proven"),
        (501, "receiver is reachable but does not answer HEAD (501): POST was not proven"),
        (500, None),
        (503, None),
    ],
)
def test_check_reads_the_head_status(
    receiver: Receiver, sink: HttpMultipartSink, status: int, verdict: str | None
) -> None:
    receiver.reply(Reply(status))
    if verdict is not None:
        assert sink.check() == verdict
        return
    with pytest.raises(DeliveryError) as caught:
        sink.check()
    assert caught.value.message.startswith(f"http: HTTP {status} ")
    assert receiver.requests[-1].method == "HEAD"


def test_target_hides_the_url_credentials_and_query(receiver: Receiver) -> None:
    url = receiver.url.replace("http://", "http://user:url-password@") + "hook?token=query-secret#frag"
    http = HttpMultipartSink(url, SECRET, timeout=5)
    try:
        assert http.target() == receiver.url.replace("http://", "http://user@") + "hook"
    finally:
        http.close()
