"""The promise every sink type keeps against its real server, checked the same way for all six (http in both modes).

What arrives is what was sent, for a job that wrote one file and for one that wrote two: each
file's bytes under its own name (or part), and one event listing them. While the server is away
a delivery (and a check) fails with a retryable DeliveryError; once it is back the next delivery
succeeds and the event is there exactly once, since the failed attempt never reached the server.
Many threads sharing one sink, as the worker's do, each get their events there intact.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, cast

import boto3
import pika
import pytest
import redis
from support.moto_server import MotoServer
from support.pipeline import HTTP_SECRET, multipart_files
from support.receiver import Receiver
from support.services import require_service
from support.sink_dir import written
from support.tcp_proxy import TcpProxy

from webhook.ci.crc64 import crc64ecma
from webhook.dev.sandbox import Sandbox
from webhook.models import Event, FetchedFile, Job, JobFile, ObjectLocation
from webhook.sinks import DeliveryError, Sink
from webhook.sinks.amqp import AmqpSink
from webhook.sinks.common import audio_names
from webhook.sinks.cos import CosSink
from webhook.sinks.events import SCHEMA, build_event, event_document
from webhook.sinks.filesystem import FilesystemSink
from webhook.sinks.http import HttpMultipartSink, HttpNotifySink, HttpPostSink
from webhook.sinks.options import AmqpOptions, CosOptions, RedisOptions, S3Options
from webhook.sinks.redis import RedisSink
from webhook.sinks.s3 import S3Sink

AUDIO = bytes(range(256)) * 64 + b"tail"
SECOND = b"second part " * 1000  # another job file's bytes, of another length
OUTPUT = ObjectLocation("audio-1250000000", "ap-guangzhou", "out/denoised.wav")
PARTS = (  # what a job that wrote two files names in MediaResult, in this order
    ObjectLocation("audio-1250000000", "ap-guangzhou", "out/denoised-1.wav"),
    ObjectLocation("audio-1250000000", "ap-guangzhou", "out/denoised-2.mp3"),
)
PREFIX = "denoised/"
REDIS = ("127.0.0.1", 6379)
RABBITMQ = ("127.0.0.1", 5672)


@dataclass(frozen=True)
class Arrival:
    """One copy of an event as the server holds it.

    ``document`` is the event document, ``audio`` the bytes of each of its files, in the order it
    lists them, for a sink that carries them, ``ids`` what names it there: the objects or files for
    a storage sink, the ids and type a message carries for the others.
    """

    document: dict[str, Any]
    audio: tuple[bytes, ...]
    ids: tuple[str, ...]


class Harness:
    """A sink pointed at its real server, and the means to read that server and to take it away."""

    sink: Sink
    prefix = ""  # of the names a storage sink gives
    restart_forgets = False  # the server comes back empty: only what arrives afterwards is there
    # What a delivery and a check say while the server is away: {h} is the harness, {key} the audio's key.
    delivery_refused = check_refused = ""

    def __init__(self, tmp_path: Path, stack: ExitStack) -> None:
        self.tmp_path = tmp_path
        self.stack = stack  # closed after the test, or as soon as building the harness fails

    def event(self, job_id: str, files: int = 1) -> Event:
        """A succeeded job's event with its output fetched to disk, as the worker hands it over:
        one file, or the two ``PARTS`` of a job that wrote two."""
        sources, contents = ((OUTPUT,), (AUDIO,)) if files == 1 else (PARTS, (AUDIO, SECOND))
        fetched = []
        for number, (source, content) in enumerate(zip(sources, contents, strict=True), start=1):
            path = self.tmp_path / f"{job_id}.{number}.part"
            path.write_bytes(content)
            file = FetchedFile(str(path), len(content), str(crc64ecma(content)), "audio/wav")
            fetched.append(JobFile(source, file, number, len(sources)))
        job = Job(job_id=job_id, tag="NoiseReduction", state="Success", output=sources[0], user_data="order-42")
        return build_event(job, self.sink.name, fetched)

    def expected(self, event: Event) -> Arrival:
        """What the server holds once ``event`` was delivered (a storage sink's default): each file
        under its name, then a document that names what each was stored as."""
        names = audio_names(self.prefix, event)
        ids = sorted([f"{event.job.job_id}.event.json", *(name.removeprefix(self.prefix) for name in names)])
        return Arrival(event_document(event, names), contents(event), tuple(ids))

    def arrivals(self) -> list[Arrival]:
        raise NotImplementedError

    def refused(self, event: Event) -> tuple[str, str]:
        """The messages of delivering ``event`` and of a check while the server is away (at its first file)."""
        check = self.check_refused or self.delivery_refused
        return self.delivery_refused.format(h=self, key=audio_names(PREFIX, event)[0]), check.format(h=self)

    def away(self) -> None:
        raise NotImplementedError

    def back(self) -> None:
        raise NotImplementedError


def contents(event: Event) -> tuple[bytes, ...]:
    """The bytes of each of ``event``'s files, in its order."""
    return tuple(Path(file.fetched.path).read_bytes() for file in event.files if file.fetched.path)


def stored(names: Iterable[str], read: Callable[[str], bytes], prefix: str = "") -> list[Arrival]:
    """A storage sink's arrivals: ``<job>.event.json`` and the ``<job>.…`` files under ``prefix``, their
    bytes in the order the document lists them by ``stored_as``; a stray stands alone."""
    objects = {name.removeprefix(prefix): read(name) for name in names}
    arrivals, claimed = [], set()
    for name in sorted(n for n in objects if n.endswith(".event.json")):
        job_id = name.removesuffix(".event.json")
        group = tuple(sorted(n for n in objects if n.split(".", 1)[0] == job_id))
        document = json.loads(objects[name])
        listed = [file["stored_as"].removeprefix(prefix) for file in document["files"]]
        arrivals.append(Arrival(document, tuple(objects.get(n, b"<missing>") for n in listed), group))
        claimed.update(group)
    return arrivals + [Arrival({}, (objects[n],), (n,)) for n in sorted(objects.keys() - claimed)]


class FilesystemHarness(Harness):
    """A directory; away, a regular file stands where it should be (root ignores permissions, not that)."""

    delivery_refused = "filesystem: cannot write {h.root}: File exists"
    check_refused = "filesystem: cannot write in {h.root}: File exists"

    def __init__(self, tmp_path: Path, stack: ExitStack) -> None:
        super().__init__(tmp_path, stack)
        self.root = tmp_path / "sink" / "out"
        self.aside = tmp_path / "sink" / "out.away"
        self.sink = FilesystemSink(self.root)

    def arrivals(self) -> list[Arrival]:
        return stored(written(self.root), lambda name: (self.root / name).read_bytes())

    def away(self) -> None:
        self.root.rename(self.aside)
        self.root.write_bytes(b"")

    def back(self) -> None:
        self.root.unlink()
        self.aside.rename(self.root)


class HttpHarness(Harness):
    """A recording receiver of multipart bodies; away, it is stopped, and back on the same port."""

    delivery_refused = "http: request failed: Connection refused"
    sink_class: type[HttpPostSink] = HttpMultipartSink

    def __init__(self, tmp_path: Path, stack: ExitStack) -> None:
        super().__init__(tmp_path, stack)
        self.receiver = self.stack.enter_context(Receiver())
        self.sink = self.sink_class(self.receiver.url + "hooks", HTTP_SECRET, timeout=5)
        self.stack.callback(self.sink.close)

    def expected(self, event: Event) -> Arrival:
        return Arrival(event_document(event), contents(event), (event.event_id,))

    def arrivals(self) -> list[Arrival]:
        return [Arrival(*multipart_files(r), (r.headers["webhook-id"],)) for r in self.receiver.requests]

    def away(self) -> None:
        self.receiver.stop()

    def back(self) -> None:
        self.receiver.start()


class HttpJsonHarness(HttpHarness):
    """The same receiver, sent the event document alone (json mode)."""

    sink_class = HttpNotifySink

    def expected(self, event: Event) -> Arrival:
        return Arrival(event_document(event), (), (event.event_id,))

    def arrivals(self) -> list[Arrival]:
        return [Arrival(json.loads(r.body or b""), (), (r.headers["webhook-id"],)) for r in self.receiver.requests]


class CosHarness(Harness):
    """The COS sandbox (the upload path, from the file on disk); away, it is stopped, and back on the same port."""

    bucket = "archive-1250000000"
    prefix = PREFIX
    delivery_refused = "archive: put_object cos://{h.bucket}/{key}: COS unreachable: Connection refused"
    check_refused = "archive: head_bucket cos://{h.bucket}/: COS unreachable: Connection refused"

    def __init__(self, tmp_path: Path, stack: ExitStack) -> None:
        super().__init__(tmp_path, stack)
        self.sandbox = self.stack.enter_context(Sandbox(tmp_path / "sandbox").start())
        self.port = self.sandbox.port
        options = CosOptions(bucket=self.bucket, region=OUTPUT.region, prefix=PREFIX, server_side_copy=False)
        self.sink = CosSink(
            "archive",
            options,
            secret_id=self.sandbox.secret_id,
            secret_key=self.sandbox.secret_key,
            default_endpoint=self.sandbox.endpoint,
        )
        self.stack.callback(self.sink.close)

    def arrivals(self) -> list[Arrival]:
        # Keys from the sandbox's own sidecar files (its store has no listing), bytes through the SDK.
        keys = [json.loads(p.read_text())["key"] for p in (self.sandbox.root / self.bucket).glob("*.json")]
        client = self.sandbox.client(OUTPUT.region)
        return stored(
            keys, lambda key: client.get_object(Bucket=self.bucket, Key=key)["Body"].get_raw_stream().read(), PREFIX
        )

    def away(self) -> None:
        self.sandbox.stop()

    def back(self) -> None:
        self.sandbox.start(port=self.port)


class S3Harness(Harness):
    """A bucket on moto's S3 server; away, the server is stopped, and back on the same port, empty."""

    restart_forgets = True
    prefix = PREFIX
    delivery_refused = "archive: upload s3://{h.bucket}/{key}: EndpointConnectionError: Connection refused"
    check_refused = "archive: head_bucket s3://{h.bucket}/: EndpointConnectionError: Connection refused"

    def __init__(self, tmp_path: Path, stack: ExitStack, moto: MotoServer) -> None:
        super().__init__(tmp_path, stack)
        self.moto = moto
        self.bucket = f"sink-{uuid.uuid4().hex[:12]}"
        self.client = boto3.client(
            "s3", endpoint_url=moto.url, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
        )
        self.client.create_bucket(Bucket=self.bucket)
        options = S3Options(bucket=self.bucket, prefix=PREFIX, endpoint_url=moto.url)
        self.sink = S3Sink("archive", options, access_key_id="k", secret_access_key="s")
        stack.callback(self.sink.close)

    def arrivals(self) -> list[Arrival]:
        keys = [item["Key"] for item in self.client.list_objects_v2(Bucket=self.bucket).get("Contents", [])]
        return stored(keys, lambda key: self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read(), PREFIX)

    def away(self) -> None:
        self.moto.stop()

    def back(self) -> None:
        self.moto.start()
        self.client.create_bucket(Bucket=self.bucket)  # a restarted moto has lost its buckets


class MessageHarness(Harness):
    """A broker sink: the event document without the file, reached through a TCP proxy that goes down and up."""

    proxy: TcpProxy

    def expected(self, event: Event) -> Arrival:
        return Arrival(event_document(event), (), (event.event_id, event.type, event.job.job_id, SCHEMA))

    def away(self) -> None:
        self.proxy.down()

    def back(self) -> None:
        self.proxy.up()


class RedisHarness(MessageHarness):
    """A stream of the test's own on the shared Redis."""

    delivery_refused = (
        "redis: redis 127.0.0.1:{h.proxy.port}: Error 111 connecting to 127.0.0.1:{h.proxy.port}. Connection refused."
    )

    def __init__(self, tmp_path: Path, stack: ExitStack) -> None:
        super().__init__(tmp_path, stack)
        require_service("Redis", *REDIS)
        self.stream = f"test:cos-webhook:{uuid.uuid4().hex}"
        self.client = self.stack.enter_context(redis.Redis(*REDIS, decode_responses=True))
        self.stack.callback(self.client.delete, self.stream)
        self.proxy = self.stack.enter_context(TcpProxy(REDIS))
        options = RedisOptions(url=f"redis://127.0.0.1:{self.proxy.port}/0", stream=self.stream)
        self.sink = RedisSink("redis", options, password=None, timeout=5)
        self.stack.callback(self.sink.close)

    def arrivals(self) -> list[Arrival]:
        entries = cast(list[tuple[str, dict[str, str]]], self.client.xrange(self.stream))
        return [
            Arrival(json.loads(e["data"]), (), (e["event_id"], e["type"], e["job_id"], e["schema"])) for _, e in entries
        ]


class AmqpHarness(MessageHarness):
    """An exchange of the test's own on the shared RabbitMQ, and a queue bound to it."""

    delivery_refused = "amqp: amqp 127.0.0.1:{h.proxy.port}: Connection refused"

    def __init__(self, tmp_path: Path, stack: ExitStack) -> None:
        super().__init__(tmp_path, stack)
        require_service("RabbitMQ", *RABBITMQ)
        exchange = f"test.cos-webhook.{uuid.uuid4().hex}"
        connection = pika.BlockingConnection(pika.ConnectionParameters(*RABBITMQ))
        self.stack.callback(connection.close)
        self.channel = connection.channel()
        self.stack.callback(self.channel.exchange_delete, exchange)
        self.proxy = self.stack.enter_context(TcpProxy(RABBITMQ))
        options = AmqpOptions(url=f"amqp://127.0.0.1:{self.proxy.port}/%2F", exchange=exchange)
        self.sink = AmqpSink("amqp", options, username="guest", password="guest", timeout=5)
        self.stack.callback(self.sink.close)
        self.sink.check()  # declares the exchange, so that a queue can be bound to it
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.queue, exchange, routing_key=options.routing_key)
        self.messages: list[Arrival] = []

    def arrivals(self) -> list[Arrival]:
        while True:  # taking a message off the queue consumes it: keep every one read so far
            method, properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return list(self.messages)
            ids = (properties.message_id, properties.type, properties.headers["job_id"], properties.headers["schema"])
            self.messages.append(Arrival(json.loads(body), (), ids))


HARNESSES: dict[str, type[Harness]] = {
    "filesystem": FilesystemHarness,
    "http": HttpHarness,
    "http-json": HttpJsonHarness,
    "cos": CosHarness,
    "s3": S3Harness,
    "redis": RedisHarness,
    "amqp": AmqpHarness,
}


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    """One S3 server for the module: each harness has a bucket of its own on it."""
    with MotoServer() as server:
        yield server


@pytest.fixture
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    """The harness of the sink type the test is parametrized with."""
    with ExitStack() as stack:
        if request.param == "s3":
            yield S3Harness(tmp_path, stack, request.getfixturevalue("moto"))
        else:
            yield HARNESSES[request.param](tmp_path, stack)


@pytest.mark.parametrize("files", [1, 2], ids=["one-file", "two-files"])
@pytest.mark.parametrize("harness", list(HARNESSES), indirect=True)
def test_what_arrives_is_what_was_sent(harness: Harness, files: int) -> None:
    event = harness.event("job-a", files)

    harness.sink.deliver(event)

    assert harness.arrivals() == [harness.expected(event)]
    assert [file["name"] for file in harness.arrivals()[0].document["files"]] == (
        ["denoised.wav"] if files == 1 else ["denoised-1.wav", "denoised-2.mp3"]
    )


@pytest.mark.parametrize("harness", ["filesystem", "cos", "s3"], indirect=True)
def test_a_storage_sink_names_one_file_as_before_and_several_by_number(harness: Harness) -> None:
    one, two = harness.event("job-a"), harness.event("job-b", files=2)

    harness.sink.deliver(one)
    harness.sink.deliver(two)
    harness.sink.deliver(two)  # again: the same names, rewritten

    assert [arrival.ids for arrival in harness.arrivals()] == [
        ("job-a.event.json", "job-a.wav"),
        ("job-b.1.wav", "job-b.2.mp3", "job-b.event.json"),
    ]


# The COS SDK pauses before retrying a refused connection: its case takes about two seconds.
@pytest.mark.parametrize(
    "harness", [pytest.param(k, marks=pytest.mark.slow) if k == "cos" else k for k in HARNESSES], indirect=True
)
def test_server_away_is_retryable_and_the_event_lands_once_when_it_is_back(harness: Harness) -> None:
    first, second = harness.event("job-a"), harness.event("job-b", files=2)
    harness.sink.deliver(first)  # connected, with a connection to lose

    harness.away()
    with pytest.raises(DeliveryError) as delivering:
        harness.sink.deliver(second)
    with pytest.raises(DeliveryError) as checking:
        harness.sink.check()
    harness.back()
    harness.sink.deliver(second)

    assert (delivering.value.permanent, checking.value.permanent) == (False, False)
    assert (delivering.value.message, checking.value.message) == harness.refused(second)
    kept = [] if harness.restart_forgets else [harness.expected(first)]
    assert harness.arrivals() == [*kept, harness.expected(second)]


@pytest.mark.parametrize("harness", list(HARNESSES), indirect=True)
def test_deliveries_from_many_threads_at_once_all_arrive_intact(harness: Harness) -> None:
    # As the worker runs jobs: one sink shared by 8 threads, each delivering its own events.
    threads, per_thread = 8, 5
    events = [harness.event(f"job-{n:02d}", files=1 + n % 2) for n in range(threads * per_thread)]
    together = threading.Barrier(threads, timeout=30)

    def deliver(batch: list[Event]) -> None:
        together.wait()
        for event in batch:
            harness.sink.deliver(event)

    with ThreadPoolExecutor(threads) as pool:
        done = [pool.submit(deliver, events[n::threads]) for n in range(threads)]
    assert [repr(future.exception()) for future in done if future.exception()] == []
    by_ids = attrgetter("ids")
    assert sorted(harness.arrivals(), key=by_ids) == sorted(map(harness.expected, events), key=by_ids)
