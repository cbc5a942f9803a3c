"""AmqpSink against a real RabbitMQ: message properties, confirms, returns, outages, permanent failures."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pika
import pytest
from support.events import PRESIGNED, notified
from support.events import failed as failed_event
from support.pipeline import Pipeline
from support.rabbitmq import rabbitmq_user
from support.services import require_service
from support.tcp_proxy import TcpProxy

from webhook.config import Settings
from webhook.errors import ConfigError
from webhook.models import Event, FileLocation
from webhook.sinks import DeliveryError
from webhook.sinks import amqp as amqp_module
from webhook.sinks.amqp import AmqpSink
from webhook.sinks.build import build_sinks, sink_context
from webhook.sinks.events import SCHEMA, event_document, event_id
from webhook.sinks.options import AmqpOptions

HOST, PORT = "127.0.0.1", 5672
URL = f"amqp://{HOST}:{PORT}/%2F"
ROUTING_KEY = "cos-webhook.job"

SinkFactory = Callable[..., AmqpSink]


def succeeded(job_id: str = "job-1", sink: str = "amqp") -> Event:
    return notified(
        FileLocation("cos", "archive-1250000000", "denoised/job-1.wav", "ap-guangzhou", url=PRESIGNED), job_id, sink
    )


def failed(job_id: str = "job-2") -> Event:
    return failed_event("amqp", job_id)


@pytest.fixture
def broker() -> Iterator[Any]:
    """A channel of the test's own, to bind queues and read what the sink published."""
    require_service("RabbitMQ", HOST, PORT)
    connection = pika.BlockingConnection(pika.URLParameters(URL))
    yield connection.channel()
    connection.close()


@pytest.fixture
def exchange(broker: Any) -> Iterator[str]:
    name = f"test.cos-webhook.{uuid.uuid4().hex}"
    yield name
    broker.exchange_delete(name)


@pytest.fixture
def make_sink(exchange: str) -> Iterator[SinkFactory]:
    """Builds sinks on the test's exchange (``url``, credentials, option overrides); closes them afterwards."""
    made: list[AmqpSink] = []

    def make(
        url: str = URL, username: str | None = "guest", password: str | None = "guest", **options: Any
    ) -> AmqpSink:
        options.setdefault("exchange", exchange)
        sink = AmqpSink("amqp", AmqpOptions(url=url, **options), username=username, password=password, timeout=5)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()


def bound_queue(broker: Any, exchange: str) -> str:
    """An exclusive queue bound to ``exchange`` with the sink's routing key (the exchange must exist)."""
    queue = broker.queue_declare("", exclusive=True).method.queue
    broker.queue_bind(queue, exchange, routing_key=ROUTING_KEY)
    return str(queue)


def received(broker: Any, queue: str) -> list[tuple[Any, Any, bytes]]:
    """Every message in ``queue``, taken off it."""
    messages: list[tuple[Any, Any, bytes]] = []
    while True:
        method, properties, body = broker.basic_get(queue, auto_ack=True)
        if method is None:
            return messages
        messages.append((method, properties, body))


def test_message_is_persistent_json_with_ids(broker: Any, exchange: str, make_sink: SinkFactory) -> None:
    sink = make_sink()
    event = succeeded()
    assert not sink.needs_bytes(event.job)
    assert sink.check() == "accepts messages"
    queue = bound_queue(broker, exchange)

    sink.deliver(event)

    ((method, properties, body),) = received(broker, queue)
    assert (method.exchange, method.routing_key) == (exchange, ROUTING_KEY)
    assert properties.delivery_mode == 2
    assert properties.content_type == "application/json"
    assert properties.message_id == event_id("job-1", "amqp")
    assert properties.type == "job.succeeded"
    assert properties.headers == {"job_id": "job-1", "schema": SCHEMA}
    document = json.loads(body)
    assert document == event_document(event)
    assert document["file"]["location"]["url"] == PRESIGNED


def test_failed_job_has_no_file(broker: Any, exchange: str, make_sink: SinkFactory) -> None:
    sink = make_sink(exchange_type="fanout")
    sink.check()
    queue = bound_queue(broker, exchange)

    sink.deliver(failed())

    ((_, properties, body),) = received(broker, queue)
    assert properties.type == "job.failed"
    assert json.loads(body)["file"] is None


def test_unroutable_message_is_retryable_until_a_queue_is_bound(
    broker: Any, exchange: str, make_sink: SinkFactory
) -> None:
    sink = make_sink()
    with pytest.raises(DeliveryError) as caught:
        sink.deliver(succeeded())
    assert not caught.value.permanent
    assert f"exchange {exchange} routed the message to no queue" in caught.value.message
    assert repr(ROUTING_KEY) in caught.value.message

    queue = bound_queue(broker, exchange)
    sink.deliver(succeeded())  # the same connection: a return does not break it
    assert len(received(broker, queue)) == 1


def test_nack_is_retryable(broker: Any, exchange: str, make_sink: SinkFactory) -> None:
    sink = make_sink()
    sink.check()
    full = {"x-max-length": 0, "x-overflow": "reject-publish"}
    queue = broker.queue_declare("", exclusive=True, arguments=full).method.queue
    broker.queue_bind(queue, exchange, routing_key=ROUTING_KEY)

    with pytest.raises(DeliveryError) as caught:
        sink.deliver(succeeded())
    assert not caught.value.permanent
    assert "nacked" in caught.value.message


def test_restart_while_idle_reconnects_without_a_failed_attempt(
    broker: Any, exchange: str, make_sink: SinkFactory
) -> None:
    with TcpProxy((HOST, PORT)) as proxy:
        sink = make_sink(url=f"amqp://127.0.0.1:{proxy.port}/%2F")
        sink.check()
        queue = bound_queue(broker, exchange)
        sink.deliver(succeeded("job-a"))
        proxy.down()  # drops the sink's connection while it is idle
        proxy.up()
        sink.deliver(succeeded("job-b"))

    assert len(received(broker, queue)) == 2


class SteppedClock:
    """``time`` for the sink's module: the real monotonic clock, moved ahead by what a test skips."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.skipped

    def skip(self, seconds: float) -> None:
        self.skipped += seconds


HEARTBEAT = 60  # seconds, asked of the broker by the sinks below


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> SteppedClock:
    """The sink's clock. Idle time is skipped on it rather than slept: real time stays far from both
    the sink's reconnect point (half the heartbeat) and the broker's drop, however loaded the machine."""
    stepped = SteppedClock()
    monkeypatch.setattr(amqp_module, "time", stepped)
    return stepped


@contextmanager
def counted_sink(make_sink: SinkFactory) -> Iterator[tuple[TcpProxy, AmqpSink]]:
    """A checked sink whose connections go through a proxy that counts them."""
    with TcpProxy((HOST, PORT)) as proxy:
        sink = make_sink(url=f"amqp://127.0.0.1:{proxy.port}/%2F?heartbeat={HEARTBEAT}")
        sink.check()
        yield proxy, sink


def test_connection_is_reused_and_closed_before_the_broker_would_drop_it(
    broker: Any, exchange: str, make_sink: SinkFactory, caplog: pytest.LogCaptureFixture, clock: SteppedClock
) -> None:
    with counted_sink(make_sink) as (proxy, sink):
        queue = bound_queue(broker, exchange)
        sink.deliver(succeeded("job-a"))
        clock.skip(HEARTBEAT / 3)  # idle, but not for half the heartbeat
        sink.deliver(succeeded("job-b"))
        assert proxy.accepted == 1

        # Idle for over half the heartbeat: the sink reconnects rather than wait to be dropped.
        clock.skip(HEARTBEAT / 2 + 1)
        sink.deliver(succeeded("job-c"))
        assert proxy.accepted == 2

    assert len(received(broker, queue)) == 3
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_deliveries_at_once_get_a_connection_each_and_idle_ones_are_closed(
    broker: Any, exchange: str, make_sink: SinkFactory, caplog: pytest.LogCaptureFixture, clock: SteppedClock
) -> None:
    with counted_sink(make_sink) as (proxy, sink):
        queue = bound_queue(broker, exchange)
        together = threading.Barrier(3, timeout=30)  # a failing step breaks it rather than hang

        def held(_link: object) -> None:
            together.wait()  # until three threads hold a connection of the sink at once

        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda _: sink._call(held), range(3)))
        assert proxy.accepted == 3

        # One delivery at a time from now on: the most recently used connection serves them all,
        # and the two left idle are closed once idle for half the heartbeat, before the broker
        # would drop them.
        sink.deliver(succeeded("job-a"))
        clock.skip(HEARTBEAT / 3)
        sink.deliver(succeeded("job-b"))
        clock.skip(HEARTBEAT / 3)
        sink.deliver(succeeded("job-c"))
        assert (proxy.accepted, proxy.settled(1)) == (3, 1)

        sink.close()
        assert proxy.settled(0) == 0

    assert len(received(broker, queue)) == 3
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.slow
def test_confirm_that_never_comes_times_out(broker: Any, exchange: str, make_sink: SinkFactory) -> None:
    with TcpProxy((HOST, PORT)) as proxy:
        sink = make_sink(url=f"amqp://127.0.0.1:{proxy.port}/%2F", confirm_timeout=0.5)
        sink.check()
        queue = bound_queue(broker, exchange)
        proxy.stall()  # the broker is reachable but answers nothing
        with pytest.raises(DeliveryError) as caught:
            sink.deliver(succeeded())
        assert not caught.value.permanent
        assert "no answer within 0.5s while waiting for the publisher confirm" in caught.value.message

        proxy.up()
        sink.deliver(succeeded())  # on a new connection: the stalled one was dropped

    # The timed-out publish may or may not have reached the broker: at least once, same message_id.
    ids = {properties.message_id for _, properties, _ in received(broker, queue)}
    assert ids == {event_id("job-1", "amqp")}


def test_wrong_password_is_permanent(exchange: str, make_sink: SinkFactory) -> None:
    sink = make_sink(password="not-the-password-7f3a")

    with pytest.raises(DeliveryError) as caught:
        sink.deliver(succeeded())
    assert caught.value.permanent
    assert "ACCESS_REFUSED" in caught.value.message
    assert "not-the-password-7f3a" not in caught.value.message
    with pytest.raises(DeliveryError) as checked:
        sink.check()
    assert checked.value.permanent


def test_unknown_vhost_is_permanent(exchange: str, make_sink: SinkFactory) -> None:
    with pytest.raises(DeliveryError) as caught:
        make_sink(url=f"amqp://{HOST}:{PORT}/no-such-vhost").deliver(succeeded())
    assert caught.value.permanent
    assert "NOT_ALLOWED" in caught.value.message


def test_exchange_declared_with_another_type_is_permanent(broker: Any, exchange: str, make_sink: SinkFactory) -> None:
    broker.exchange_declare(exchange, "fanout", durable=True)
    sink = make_sink(exchange_type="topic")

    with pytest.raises(DeliveryError) as caught:
        sink.deliver(succeeded())
    assert caught.value.permanent
    assert "PRECONDITION_FAILED" in caught.value.message
    with pytest.raises(DeliveryError) as checked:
        sink.check()
    assert checked.value.permanent


def test_missing_exchange_without_declare_is_retryable(broker: Any, exchange: str, make_sink: SinkFactory) -> None:
    sink = make_sink(declare=False)
    with pytest.raises(DeliveryError) as caught:
        sink.check()
    assert not caught.value.permanent
    assert "NOT_FOUND" in caught.value.message

    broker.exchange_declare(exchange, "topic", durable=True)  # its owner creates it
    queue = bound_queue(broker, exchange)
    assert sink.check() == "accepts messages"
    sink.deliver(succeeded())
    assert len(received(broker, queue)) == 1


def test_check_fails_when_nothing_listens(make_sink: SinkFactory) -> None:
    with TcpProxy((HOST, PORT)) as proxy:
        url = f"amqp://127.0.0.1:{proxy.port}/%2F"
        proxy.down()
        with pytest.raises(DeliveryError) as caught:
            make_sink(url=url).check()
    assert not caught.value.permanent
    assert f"amqp 127.0.0.1:{proxy.port}: Connection refused" in caught.value.message


def test_bad_url_parameter_is_a_config_error() -> None:
    options = AmqpOptions(url=f"{URL}?heartbeat=often", exchange="x")
    with pytest.raises(ConfigError, match=r"^sink amqp: options.url: Invalid heartbeat value 'often'"):
        AmqpSink("amqp", options, username=None, password=None)


@pytest.mark.slow  # rabbitmqctl adds a user; the broker delays a refused login
def test_credentials_from_the_environment(broker: Any, exchange: str, tmp_path: Path) -> None:
    """The URL names no user: the credentials are the named variables' values, not pika's guest/guest."""
    config = tmp_path / "cos-webhook.toml"
    config.write_text(
        f"""
[[sinks]]
name = "events"
type = "amqp"
options = {{ url = "{URL}", exchange = "{exchange}", username_env = "AMQP_USER", password_env = "AMQP_PASSWORD" }}
"""
    )

    def built(environ: dict[str, str]) -> AmqpSink:
        (sink,) = build_sinks(Settings(config_path=str(config)).sinks, sink_context(Settings(), environ)).values()
        assert isinstance(sink, AmqpSink)
        return sink

    with rabbitmq_user() as (user, password):
        # The broker sees what the variables hold: a wrong password in them is refused.
        refused = built({"AMQP_USER": user, "AMQP_PASSWORD": "not-" + password})
        try:
            with pytest.raises(DeliveryError) as caught:
                refused.check()
        finally:
            refused.close()
        assert caught.value.permanent
        assert "ACCESS_REFUSED" in caught.value.message
        assert password not in caught.value.message

        sink = built({"AMQP_USER": user, "AMQP_PASSWORD": password})
        try:
            assert sink.check() == "accepts messages"
            queue = bound_queue(broker, exchange)
            sink.deliver(succeeded(sink="events"))
        finally:
            sink.close()
    ((_, properties, _),) = received(broker, queue)
    assert properties.message_id == event_id("job-1", "events")


def test_pipeline_publishes_where_the_file_is(pipeline: Pipeline, broker: Any, exchange: str, tmp_path: Path) -> None:
    broker.exchange_declare(exchange, "topic", durable=True)
    queue = bound_queue(broker, exchange)
    config = tmp_path / "cos-webhook.toml"
    config.write_text(
        f"""
[[sinks]]
name = "events"
type = "amqp"
options = {{ url = "amqp://guest:guest@{HOST}:{PORT}/%2F", exchange = "{exchange}", file_from = "filesystem" }}
"""
    )
    job_id, status = pipeline.run_job(config)
    assert status == "delivered"

    ((_, properties, body),) = received(broker, queue)
    assert (properties.message_id, properties.headers["job_id"]) == (event_id(job_id, "events"), job_id)
    location = json.loads(body)["file"]["location"]
    assert location["kind"] == "filesystem"
    # It points at the filesystem sink's copy, which holds the very bytes CI wrote.
    assert Path(location["path"]).read_bytes() == pipeline.output_bytes()
