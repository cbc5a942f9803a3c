"""Which sinks exist: ``[[sinks]]`` tables of the TOML file, and the simple ones environment variables declare.

Each sink has a name, a type, its options, filters (``events``, ``tags``) and its own retry
policy. Secrets are never written in the file: options ending in ``_env`` name the environment
variable that holds them. A problem in the file raises :class:`ConfigError` naming the file,
the key and the reason, so a bad file stops start-up with a message that says what to fix.

Only validation: the sinks are built from these specs by :mod:`webhook.sinks.build`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, cast

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, create_model

from webhook.errors import ConfigError
from webhook.models import Job
from webhook.retry import BreakerPolicy, RetryPolicy
from webhook.sinks.options import FilesystemOptions, HttpMode, HttpOptions, NotifyOptions, SinkOptions
from webhook.sinks.registry import SINK_TYPES

NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class SinkSpec(BaseModel):
    """One ``[[sinks]]`` table; each type narrows ``type`` and ``options`` (see :data:`SPECS`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=NAME)]
    type: str
    options: SinkOptions
    events: frozenset[Literal["success", "failure"]] = frozenset({"success", "failure"})
    tags: frozenset[str] | None = None  # None: every tag in WEBHOOK_ALLOWED_TAGS
    retry: RetryPolicy = RetryPolicy()
    concurrency: PositiveInt | None = None  # deliveries in flight per worker; None: WEBHOOK_SINK_CONCURRENCY
    breaker: BreakerPolicy | None = None  # None: WEBHOOK_BREAKER_FAILURES / WEBHOOK_BREAKER_PAUSE

    def accepts(self, job: Job) -> bool:
        """Whether this sink takes ``job`` (its outcome and tag pass the filters)."""
        event = "success" if job.succeeded else "failure"
        return event in self.events and (self.tags is None or job.tag in self.tags)


SPECS: dict[str, type[SinkSpec]] = {
    name: create_model(
        f"{name.title()}Spec",
        __base__=SinkSpec,
        type=(cast(Any, Literal)[name], ...),
        options=(sink_type.options, ...),
    )
    for name, sink_type in SINK_TYPES.items()
}

if TYPE_CHECKING:
    AnySinkSpec = SinkSpec
else:  # the tagged union pydantic validates against, one member per registry row
    AnySinkSpec = Annotated[Union[tuple(SPECS.values())], Field(discriminator="type")]  # noqa: UP007


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sinks: list[AnySinkSpec] = []


def load_sinks(path: Path, data: dict[str, Any]) -> list[SinkSpec]:
    """Validate the parsed TOML file at ``path``; :class:`ConfigError` names the key and the reason."""
    try:
        return _File.model_validate(data).sinks
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"{path}: {_key(first['loc'], data)}: {_reason(first)}") from None


def environment_sinks(
    sink_dir: str, http_url: str, http_timeout: float, http_mode: HttpMode, retry: RetryPolicy
) -> list[SinkSpec]:
    """The sinks ``WEBHOOK_SINK_DIR`` and ``WEBHOOK_HTTP_SINK_URL`` declare, named after their types."""
    specs: list[SinkSpec] = []
    if sink_dir:
        options: SinkOptions = FilesystemOptions(dir=sink_dir)
        specs.append(SPECS["filesystem"](name="filesystem", type="filesystem", options=options, retry=retry))
    if http_url:
        options = HttpOptions(url=http_url, secret_env="WEBHOOK_HTTP_SINK_SECRET", timeout=http_timeout, mode=http_mode)
        specs.append(SPECS["http"](name="http", type="http", options=options, retry=retry))
    return specs


def reference_problem(specs: list[SinkSpec]) -> str | None:
    """What is wrong between the sinks (a name used twice, a ``file_from`` naming no storage sink), if anything."""
    names = [spec.name for spec in specs]
    for name in names:
        if names.count(name) > 1:
            return f"sink name {name!r} is used twice (names are also set by WEBHOOK_SINK_DIR/…)"
    storage = {spec.name for spec in specs if SINK_TYPES[spec.type].stores}
    for spec in specs:
        if isinstance(spec.options, NotifyOptions) and spec.options.file_from not in (None, *storage):
            kinds = _either(name for name, sink_type in SINK_TYPES.items() if sink_type.stores)
            return f"sink {spec.name}: options.file_from {spec.options.file_from!r} is not a {kinds} sink"
    return None


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
        return f"type must be one of {', '.join(SINK_TYPES)}, not {error['input'].get('type')!r}"
    if error["type"] == "union_tag_not_found":
        return f"type is required ({_either(SINK_TYPES)})"
    return str(error["msg"])


def _either(names: Any) -> str:
    """``a, b or c``."""
    *rest, last = list(names)
    return f"{', '.join(rest)} or {last}" if rest else str(last)
