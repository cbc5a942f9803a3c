"""Build the configured sinks: what a worker delivers to and what ``cos-webhook check`` tries.

The settings say which sinks exist (:mod:`webhook.sinks.config` validates them); building one
imports its type's module (:data:`~webhook.sinks.registry.SINK_TYPES`) and opens its client.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping

from webhook.ci.credentials import credentials_for
from webhook.config import Settings
from webhook.errors import ConfigError
from webhook.sinks import BuildContext, Sink
from webhook.sinks.config import SinkSpec
from webhook.sinks.options import SinkOptions
from webhook.sinks.registry import SINK_TYPES


def sink_context(settings: Settings, environ: Mapping[str, str] | None = None) -> BuildContext:
    """What building sinks needs besides their options: secrets by variable name, from ``environ``
    (default: the process environment) where ``settings`` do not hold them, and the COS endpoint
    and deadlines."""
    env = dict(os.environ if environ is None else environ)
    known = {
        "WEBHOOK_HTTP_SINK_SECRET": settings.http_sink_secret,
        "COS_SECRET_ID": settings.secret_id,
        "COS_SECRET_KEY": settings.secret_key,
    }
    return BuildContext(
        env | {name: value for name, value in known.items() if value},
        settings.cos_endpoint,
        cos_timeout=settings.cos_timeout,
        min_transfer_rate=settings.min_transfer_rate,
        # None without keys or a role: a cos sink then names the variable it misses.
        cos_credentials=credentials_for(settings) if settings.secret_id or settings.credentials_role else None,
    )


def build_sinks(specs: list[SinkSpec], context: BuildContext) -> dict[str, Sink]:
    """Build each declared sink; :class:`ConfigError` names the sink and what is missing."""
    return {spec.name: build_sink(spec.type, spec.name, spec.options, context) for spec in specs}


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
