"""Every sink type in one table: its options model, its class, and the pip extra it needs.

A sink's module is imported only when a sink of its type is built, so the optional client
libraries (boto3, redis, pika) are needed only by those who configure such a sink.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from webhook.errors import ConfigError
from webhook.sinks import BuildContext, Sink
from webhook.sinks.options import (
    AmqpOptions,
    CosOptions,
    FilesystemOptions,
    HttpOptions,
    RedisOptions,
    S3Options,
    SinkOptions,
)


@dataclass(frozen=True)
class SinkType:
    options: type[SinkOptions]
    implementation: str  # "module:Class", a subclass of Sink
    extra: str | None = None  # the `pip install 'cos-webhook[extra]'` its module needs
    stores: bool = False  # keeps a copy of the file that a notification can point at (``file_from``)


SINK_TYPES: dict[str, SinkType] = {
    "filesystem": SinkType(FilesystemOptions, "webhook.sinks.filesystem:FilesystemSink", stores=True),
    "http": SinkType(HttpOptions, "webhook.sinks.http:HttpPoster"),
    "cos": SinkType(CosOptions, "webhook.sinks.cos:CosSink", stores=True),
    "s3": SinkType(S3Options, "webhook.sinks.s3:S3Sink", extra="s3", stores=True),
    "redis": SinkType(RedisOptions, "webhook.sinks.redis:RedisSink", extra="redis"),
    "amqp": SinkType(AmqpOptions, "webhook.sinks.amqp:AmqpSink", extra="amqp"),
}


def build_sink(type_name: str, name: str, options: SinkOptions, context: BuildContext) -> Sink:
    """Import the type's module and build the sink; :class:`ConfigError` names what is missing."""
    sink_type = SINK_TYPES[type_name]
    module_name, _, class_name = sink_type.implementation.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if sink_type.extra is None or (exc.name or "").startswith("webhook"):
            raise
        raise ConfigError(
            f"sink {name} (type {type_name}) needs the {sink_type.extra} extra: "
            f"pip install 'cos-webhook[{sink_type.extra}]'"
        ) from None
    sink_class: type[Sink] = getattr(module, class_name)
    return sink_class.from_options(name, options, context)
