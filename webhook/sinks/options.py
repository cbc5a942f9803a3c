"""Each sink type's options, as written in a ``[[sinks]]`` table of the configuration file.

Only pydantic models: sink modules import their options from here, and the registry names
them, without importing any sink's own client library.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

HttpMode = Literal["json", "multipart"]
"""What the http sink POSTs: the event document alone (pointing at the file), or the document and the file."""


class SinkOptions(BaseModel):
    """Options common to every sink type: none, but unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FilesystemOptions(SinkOptions):
    dir: str


class CosOptions(SinkOptions):
    bucket: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*-[0-9]+$")]
    region: str
    prefix: str = ""
    secret_id_env: str = "COS_SECRET_ID"
    secret_key_env: str = "COS_SECRET_KEY"
    # Without one, the service's own WEBHOOK_COS_ENDPOINT (if any) is used.
    endpoint: Annotated[str, Field(pattern=r"^https?://[^/\s]+/?$")] | None = None
    server_side_copy: bool = True


class S3Options(SinkOptions):
    bucket: str
    prefix: str = ""
    region: str = "us-east-1"
    endpoint_url: Annotated[str, Field(pattern=r"^https?://[^/\s]+")] | None = None
    access_key_id_env: str = "AWS_ACCESS_KEY_ID"
    secret_access_key_env: str = "AWS_SECRET_ACCESS_KEY"
    multipart_threshold_mib: PositiveInt = 16
    multipart_chunk_mib: PositiveInt = 8


class NotifyOptions(SinkOptions):
    """Options of sinks that carry a message, not the file: where the file is, instead."""

    # A storage sink's name: point at its copy (delivered first). Unset: CI's output object.
    file_from: str | None = None
    # With it, the location carries a presigned GET URL valid this many seconds (S3 allows 7 days).
    presign_seconds: Annotated[int, Field(gt=0, le=604_800)] | None = None


class HttpOptions(NotifyOptions):
    """A notification in ``json`` mode (``file_from``, ``presign_seconds`` apply); ``multipart`` carries the file."""

    url: Annotated[str, Field(pattern=r"^https?://[^/\s]+")]
    secret_env: str
    timeout: PositiveFloat = 30.0
    mode: HttpMode = "json"

    @model_validator(mode="after")
    def _locating_needs_json(self) -> HttpOptions:
        # A multipart body carries the bytes themselves: there is no location to shape.
        if self.mode == "multipart" and (self.file_from is not None or self.presign_seconds is not None):
            raise ValueError('file_from and presign_seconds need mode = "json"')
        return self


class RedisOptions(NotifyOptions):
    url: Annotated[str, Field(pattern=r"^rediss?://")] = "redis://127.0.0.1:6379/0"
    password_env: str | None = None
    stream: str
    maxlen: PositiveInt = 10_000


class AmqpOptions(NotifyOptions):
    url: Annotated[str, Field(pattern=r"^amqps?://")] = "amqp://127.0.0.1:5672/%2F"
    username_env: str | None = None
    password_env: str | None = None
    exchange: str
    exchange_type: Literal["direct", "topic", "fanout", "headers"] = "topic"
    routing_key: str = "cos-webhook.job"
    declare: bool = True
    confirm_timeout: PositiveFloat = 30.0
