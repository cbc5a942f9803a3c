"""RedisSink against a real Redis: stream entries, trimming, outages, and which failures are permanent."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from support.events import OUTPUT, PRESIGNED, notified
from support.events import failed as failed_event
from support.pipeline import Pipeline
from support.services import require_service, unavailable
from support.tcp_proxy import TcpProxy

from webhook.config import Settings
from webhook.errors import ConfigError
from webhook.models import Event, FileLocation
from webhook.sinks import DeliveryError
from webhook.sinks.build import build_sinks, sink_context
from webhook.sinks.events import SCHEMA, event_document, event_id
from webhook.sinks.options import RedisOptions
from webhook.sinks.redis import RedisSink

HOST, PORT = "127.0.0.1", 6379
URL = f"redis://{HOST}:{PORT}/0"

SinkFactory = Callable[..., RedisSink]


def succeeded(job_id: str = "job-1", sink: str = "redis") -> Event:
    return notified(FileLocation("source", OUTPUT.bucket, OUTPUT.key, OUTPUT.region, url=PRESIGNED), job_id, sink)


def failed(job_id: str = "job-2") -> Event:
    return failed_event("redis", job_id)


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    require_service("Redis", HOST, PORT)
    with redis.Redis(host=HOST, port=PORT, decode_responses=True) as connection:
        yield connection


@pytest.fixture
def stream(client: redis.Redis) -> Iterator[str]:
    name = f"test:cos-webhook:{uuid.uuid4().hex}"
    yield name
    client.delete(name)


@pytest.fixture
def make_sink(stream: str) -> Iterator[SinkFactory]:
    """Builds sinks on the test's stream (``url``, ``password``, option overrides); closes them afterwards."""
    made: list[RedisSink] = []

    def make(url: str = URL, password: str | None = None, timeout: float = 5.0, **options: Any) -> RedisSink:
        sink = RedisSink("redis", RedisOptions(url=url, stream=stream, **options), password=password, timeout=timeout)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()


def entries(client: redis.Redis, stream: str) -> list[dict[str, str]]:
    return [fields for _, fields in cast(list[tuple[str, dict[str, str]]], client.xrange(stream))]


def test_entry_carries_ids_and_the_event_document(client: redis.Redis, stream: str, make_sink: SinkFactory) -> None:
    sink = make_sink()
    event = succeeded()
    assert not sink.needs_bytes(event.job)

    sink.deliver(event)

    (entry,) = entries(client, stream)
    assert {k: v for k, v in entry.items() if k != "data"} == {
        "event_id": event_id("job-1", "redis"),
        "type": "job.succeeded",
        "job_id": "job-1",
        "schema": SCHEMA,
    }
    document = json.loads(entry["data"])
    assert document == event_document(event)
    assert document["file"]["location"] == {
        "kind": "source",
        "bucket": OUTPUT.bucket,
        "key": OUTPUT.key,
        "region": OUTPUT.region,
        "url": PRESIGNED,
    }


def test_failed_job_has_no_file(client: redis.Redis, stream: str, make_sink: SinkFactory) -> None:
    make_sink().deliver(failed())

    (entry,) = entries(client, stream)
    assert entry["type"] == "job.failed"
    document = json.loads(entry["data"])
    assert document["file"] is None
    assert document["job"]["code"] == "InvalidInput"


def test_maxlen_trims_the_stream_approximately(client: redis.Redis, stream: str, make_sink: SinkFactory) -> None:
    sink = make_sink(maxlen=100)
    for n in range(1000):
        sink.deliver(succeeded(f"job-{n}"))

    # MAXLEN ~ trims whole macro nodes (100 entries each by default): at least 100 stay, not many more.
    assert 100 <= client.xlen(stream) < 300
    assert entries(client, stream)[-1]["job_id"] == "job-999"


def test_redelivery_adds_an_entry_with_the_same_event_id(
    client: redis.Redis, stream: str, make_sink: SinkFactory
) -> None:
    sink = make_sink()
    sink.deliver(succeeded())
    sink.deliver(succeeded())  # a retry or a replay: at least once, consumers deduplicate on event_id

    assert [e["event_id"] for e in entries(client, stream)] == [event_id("job-1", "redis")] * 2


def test_restart_while_idle_reconnects_without_a_failed_attempt(
    client: redis.Redis, stream: str, make_sink: SinkFactory
) -> None:
    with TcpProxy((HOST, PORT)) as proxy:
        sink = make_sink(url=f"redis://127.0.0.1:{proxy.port}/0")
        sink.deliver(succeeded("job-a"))
        proxy.down()  # drops the pooled connection
        proxy.up()
        sink.deliver(succeeded("job-b"))

    assert [e["job_id"] for e in entries(client, stream)] == ["job-a", "job-b"]


def test_hung_server_times_out_and_the_retry_may_duplicate(
    client: redis.Redis, stream: str, make_sink: SinkFactory
) -> None:
    with TcpProxy((HOST, PORT)) as proxy:
        sink = make_sink(url=f"redis://127.0.0.1:{proxy.port}/0", timeout=0.5)
        sink.check()  # connected before the stall
        proxy.stall()
        started = time.monotonic()
        with pytest.raises(DeliveryError) as caught:
            sink.deliver(succeeded())
        assert not caught.value.permanent
        assert time.monotonic() - started < 3

        # The timed-out XADD was on its way and still lands: the retry adds a second entry.
        proxy.up()
        sink.deliver(succeeded())
        deadline = time.monotonic() + 5
        while client.xlen(stream) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)

    assert [e["event_id"] for e in entries(client, stream)] == [event_id("job-1", "redis")] * 2


def test_key_of_another_type_is_permanent(client: redis.Redis, stream: str, make_sink: SinkFactory) -> None:
    client.set(stream, "not a stream")
    sink = make_sink()

    with pytest.raises(DeliveryError) as caught:
        sink.deliver(succeeded())
    assert caught.value.permanent
    assert "WRONGTYPE" in caught.value.message

    with pytest.raises(DeliveryError) as checked:
        sink.check()
    assert checked.value.permanent
    assert f"key {stream} on {HOST}:{PORT} holds a string, not a stream" in checked.value.message


def test_check_reports_the_stream(stream: str, make_sink: SinkFactory) -> None:
    assert make_sink().check() == "writable"


def test_bad_url_parameter_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^sink redis: options.url: Invalid value for 'db'"):
        RedisSink("redis", RedisOptions(url="redis://127.0.0.1:6379/0?db=x", stream="s"), password=None)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[int]:
    """A redis-server of our own that requires the password ``s3cret``; yields its port."""
    server = shutil.which("redis-server")
    if server is None:
        unavailable("redis-server is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", "s3cret", "--save", ""],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.parametrize("password", ["wrong", None])
def test_wrong_or_missing_password_is_permanent(
    private_redis: int, make_sink: SinkFactory, password: str | None
) -> None:
    sink = make_sink(url=f"redis://127.0.0.1:{private_redis}/0", password=password)

    with pytest.raises(DeliveryError) as caught:
        sink.deliver(succeeded())
    assert caught.value.permanent
    with pytest.raises(DeliveryError) as checked:
        sink.check()
    assert checked.value.permanent


def test_password_from_the_environment(private_redis: int, stream: str, tmp_path: Path) -> None:
    config = tmp_path / "cos-webhook.toml"
    config.write_text(
        f"""
[[sinks]]
name = "events"
type = "redis"
options = {{ url = "redis://127.0.0.1:{private_redis}/0", stream = "{stream}", password_env = "TEST_REDIS_PASSWORD" }}
"""
    )
    context = sink_context(Settings(), {"TEST_REDIS_PASSWORD": "s3cret"})
    (sink,) = build_sinks(Settings(config_path=str(config)).sinks, context).values()
    try:
        assert isinstance(sink, RedisSink)
        assert sink.check() == "writable"
        sink.deliver(succeeded(sink="events"))
    finally:
        sink.close()
    with redis.Redis(port=private_redis, password="s3cret", decode_responses=True) as private:
        assert private.xrange(stream)[0][1]["event_id"] == event_id("job-1", "events")


def test_pipeline_notifies_the_stream_with_a_presigned_location(
    pipeline: Pipeline, client: redis.Redis, stream: str, tmp_path: Path
) -> None:
    config = tmp_path / "cos-webhook.toml"
    config.write_text(
        f"""
[[sinks]]
name = "events"
type = "redis"
options = {{ url = "{URL}", stream = "{stream}", presign_seconds = 600 }}
"""
    )
    job_id, status = pipeline.run_job(config)
    assert status == "delivered"

    (entry,) = entries(client, stream)
    assert (entry["event_id"], entry["job_id"], entry["type"]) == (event_id(job_id, "events"), job_id, "job.succeeded")
    document = json.loads(entry["data"])
    location = document["file"]["location"]
    assert (location["kind"], location["key"]) == ("source", "out/denoised.wav")
    assert "q-signature=" in location["url"]
    assert document["file"]["size"] == len(pipeline.output_bytes())
