"""Which sinks exist: declared in a TOML file (``WEBHOOK_CONFIG``) and/or by environment variables.

Each sink has a name, a type, its options, filters (``events``, ``tags``) and its own retry
policy. Secrets are never written in the file: options ending in ``_env`` name the environment
variable that holds them. Every problem raises :class:`ConfigError` naming the file, the key
and the reason, so a bad file stops start-up with a message that says what to fix.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from webhook.config import ConfigError, RetryPolicy, Settings
from webhook.models import Job
from webhook.sinks import Sink

NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"
EXTRAS = {"s3": "boto3", "redis": "redis", "amqp": "pika"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetrySpec(_Strict):
    max_attempts: PositiveInt = 8
    backoff_base: PositiveFloat = 2.0
    backoff_cap: PositiveFloat = 600.0
    max_age: PositiveFloat | None = None  # seconds after the callback arrived; then the delivery is dead

    def policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, self.backoff_base, self.backoff_cap, self.max_age)


class FilesystemOptions(_Strict):
    dir: str


class HttpOptions(_Strict):
    url: Annotated[str, Field(pattern=r"^https?://[^/\s]+")]
    secret_env: str
    timeout: PositiveFloat = 30.0


class CosOptions(_Strict):
    bucket: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*-[0-9]+$")]
    region: str
    prefix: str = ""
    secret_id_env: str = "COS_SECRET_ID"
    secret_key_env: str = "COS_SECRET_KEY"
    # Without one, the service's own WEBHOOK_COS_ENDPOINT (if any) is used.
    endpoint: Annotated[str, Field(pattern=r"^https?://[^/\s]+/?$")] | None = None
    server_side_copy: bool = True


class S3Options(_Strict):
    bucket: str
    prefix: str = ""
    region: str = "us-east-1"
    endpoint_url: Annotated[str, Field(pattern=r"^https?://[^/\s]+")] | None = None
    access_key_id_env: str = "AWS_ACCESS_KEY_ID"
    secret_access_key_env: str = "AWS_SECRET_ACCESS_KEY"
    multipart_threshold_mib: PositiveInt = 16
    multipart_chunk_mib: PositiveInt = 8


class NotifyOptions(_Strict):
    """Options of sinks that carry a message, not the file: where the file is, instead."""

    # A storage sink's name: point at its copy (delivered first). Unset: CI's output object.
    file_from: str | None = None
    # With it, the location carries a presigned GET URL valid this many seconds (S3 allows 7 days).
    presign_seconds: Annotated[int, Field(gt=0, le=604_800)] | None = None


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


class _SinkSpec(_Strict):
    name: Annotated[str, Field(pattern=NAME)]
    events: frozenset[Literal["success", "failure"]] = frozenset({"success", "failure"})
    tags: frozenset[str] | None = None  # None: every tag in WEBHOOK_ALLOWED_TAGS
    retry: RetrySpec = RetrySpec()

    def accepts(self, job: Job) -> bool:
        """Whether this sink takes ``job`` (its outcome and tag pass the filters)."""
        event = "success" if job.succeeded else "failure"
        return event in self.events and (self.tags is None or job.tag in self.tags)


class FilesystemSpec(_SinkSpec):
    type: Literal["filesystem"]
    options: FilesystemOptions


class HttpSpec(_SinkSpec):
    type: Literal["http"]
    options: HttpOptions


class CosSpec(_SinkSpec):
    type: Literal["cos"]
    options: CosOptions


class S3Spec(_SinkSpec):
    type: Literal["s3"]
    options: S3Options


class RedisSpec(_SinkSpec):
    type: Literal["redis"]
    options: RedisOptions


class AmqpSpec(_SinkSpec):
    type: Literal["amqp"]
    options: AmqpOptions


SinkSpec = Annotated[FilesystemSpec | HttpSpec | CosSpec | S3Spec | RedisSpec | AmqpSpec, Field(discriminator="type")]


class ConfigFile(_Strict):
    sinks: list[SinkSpec] = []


def sink_specs(settings: Settings) -> list[SinkSpec]:
    """Every configured sink: the environment's simple ones, then the file's."""
    specs: list[SinkSpec] = []
    retry = RetrySpec(
        max_attempts=settings.retry.max_attempts,
        backoff_base=settings.retry.backoff_base,
        backoff_cap=settings.retry.backoff_cap,
    )
    if settings.sink_dir:
        specs.append(
            FilesystemSpec(
                name="filesystem", type="filesystem", options=FilesystemOptions(dir=settings.sink_dir), retry=retry
            )
        )
    if settings.http_sink_url:
        options = HttpOptions.model_construct(
            url=settings.http_sink_url, secret_env="WEBHOOK_HTTP_SINK_SECRET", timeout=settings.http_sink_timeout
        )
        specs.append(HttpSpec(name="http", type="http", options=options, retry=retry))
    if settings.config_path and (settings.config_path_explicit or Path(settings.config_path).exists()):
        specs += load_file(Path(settings.config_path))
    _check_references(specs, settings.config_path)
    return specs


def load_file(path: Path) -> list[SinkSpec]:
    """Parse and validate the TOML file at ``path``."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"WEBHOOK_CONFIG: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"WEBHOOK_CONFIG: cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return ConfigFile.model_validate(data).sinks
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"{path}: {_key(first['loc'], data)}: {_reason(first)}") from None


def build_sinks(specs: list[SinkSpec], settings: Settings, environ: dict[str, str] | None = None) -> dict[str, Sink]:
    """Build each declared sink; :class:`ConfigError` names the sink and what is missing."""
    env = dict(os.environ if environ is None else environ)
    # Settings may have been given directly (tests, the demo): they win over the environment.
    known = {
        "WEBHOOK_HTTP_SINK_SECRET": settings.http_sink_secret,
        "COS_SECRET_ID": settings.secret_id,
        "COS_SECRET_KEY": settings.secret_key,
    }
    env |= {name: value for name, value in known.items() if value}
    return {spec.name: _build(spec, settings, _Secrets(spec.name, env)) for spec in specs}


class _Secrets:
    def __init__(self, sink: str, env: dict[str, str]) -> None:
        self._sink = sink
        self._env = env

    def __call__(self, variable: str | None, required: bool = True) -> str | None:
        if variable is None:
            return None
        value = self._env.get(variable, "")
        if not value and required:
            raise ConfigError(f"sink {self._sink}: environment variable {variable} is not set")
        return value or None


def _build(spec: SinkSpec, settings: Settings, secret: _Secrets) -> Sink:
    # Each sink module is imported only when a sink of its type is configured: s3, redis and
    # amqp need optional extras.
    try:
        if isinstance(spec, FilesystemSpec):
            from webhook.sinks.filesystem import FilesystemSink

            return FilesystemSink(Path(spec.options.dir), name=spec.name)
        if isinstance(spec, HttpSpec):
            from webhook.sinks.http import HttpSink

            try:
                return HttpSink(
                    spec.options.url, secret(spec.options.secret_env) or "", spec.options.timeout, name=spec.name
                )
            except ValueError as exc:
                raise ConfigError(f"sink {spec.name}: {spec.options.secret_env}: {exc}") from None
        if isinstance(spec, CosSpec):
            from webhook.sinks.cos import CosSink

            return CosSink(
                spec.name,
                spec.options,
                secret_id=secret(spec.options.secret_id_env) or "",
                secret_key=secret(spec.options.secret_key_env) or "",
                default_endpoint=settings.cos_endpoint,
            )
        if isinstance(spec, S3Spec):
            from webhook.sinks.s3 import S3Sink

            return S3Sink(
                spec.name,
                spec.options,
                access_key_id=secret(spec.options.access_key_id_env, required=False),
                secret_access_key=secret(spec.options.secret_access_key_env, required=False),
            )
        if isinstance(spec, RedisSpec):
            from webhook.sinks.redis import RedisSink

            return RedisSink(spec.name, spec.options, password=secret(spec.options.password_env))
        from webhook.sinks.amqp import AmqpSink

        return AmqpSink(
            spec.name,
            spec.options,
            username=secret(spec.options.username_env),
            password=secret(spec.options.password_env),
        )
    except ModuleNotFoundError as exc:
        extra = next((name for name, module in EXTRAS.items() if exc.name == module), None)
        if extra is None:
            raise
        raise ConfigError(
            f"sink {spec.name} (type {spec.type}) needs the {extra} extra: pip install 'cos-webhook[{extra}]'"
        ) from None


def _check_references(specs: list[SinkSpec], path: str) -> None:
    names = [spec.name for spec in specs]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{path}: sink name {name!r} is used twice (names are also set by WEBHOOK_SINK_DIR/…)")
    storage = {spec.name for spec in specs if isinstance(spec, FilesystemSpec | CosSpec | S3Spec)}
    for spec in specs:
        if isinstance(spec, RedisSpec | AmqpSpec) and spec.options.file_from not in (None, *storage):
            raise ConfigError(
                f"{path}: sink {spec.name}: options.file_from {spec.options.file_from!r} "
                f"is not a filesystem, cos or s3 sink"
            )


def _key(loc: tuple[int | str, ...], data: dict[str, Any]) -> str:
    """``sinks[2].options.bucket`` from pydantic's location, leaving out the union's type tag."""
    parts: list[str] = []
    node: Any = data
    for item in loc:
        if isinstance(item, int):
            parts[-1] += f"[{item}]"
            node = node[item] if isinstance(node, list) and item < len(node) else None
            continue
        if isinstance(node, dict) and item not in node and item == node.get("type"):
            continue  # the discriminated union adds the sink type to the path
        parts.append(item)
        node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts)


def _reason(error: Any) -> str:
    if error["type"] == "missing":
        return "required"
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "union_tag_invalid":
        return f"type must be one of filesystem, http, cos, s3, redis, amqp, not {error['input'].get('type')!r}"
    if error["type"] == "union_tag_not_found":
        return "type is required (filesystem, http, cos, s3, redis or amqp)"
    return str(error["msg"])
