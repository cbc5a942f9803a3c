"""Every sink type in one table: its options model, its class, and the pip extra it needs.

Only names: a sink's module is imported only when a sink of its type is built
(:mod:`webhook.sinks.build`), so the optional client libraries (boto3, redis, pika) are needed
only by those who configure such a sink, and reading the configuration needs none.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    "http": SinkType(HttpOptions, "webhook.sinks.http:HttpPostSink"),
    "cos": SinkType(CosOptions, "webhook.sinks.cos:CosSink", stores=True),
    "s3": SinkType(S3Options, "webhook.sinks.s3:S3Sink", extra="s3", stores=True),
    "redis": SinkType(RedisOptions, "webhook.sinks.redis:RedisSink", extra="redis"),
    "amqp": SinkType(AmqpOptions, "webhook.sinks.amqp:AmqpSink", extra="amqp"),
}
