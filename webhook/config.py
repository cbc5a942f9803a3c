"""Settings: one pydantic-settings model, read from environment variables and the sink file.

:meth:`Settings.from_env` reads the variables in :data:`ENVIRONMENT` and the TOML file that
``WEBHOOK_CONFIG`` names (default ``./cos-webhook.toml``, ignored when absent). Built directly,
``Settings(...)`` takes only what it is given (and the file, if ``config_path`` is). Every
problem raises :class:`ConfigError` naming the variable, or the file and its key.

Settings only validate: the clients and sinks they describe are built where they are used
(:func:`webhook.ci.client.client_for`, :mod:`webhook.sinks.build`).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from webhook.config_values import (
    Count,
    DatabaseUrl,
    Endpoint,
    Flag,
    HttpUrl,
    LogLevel,
    NameList,
    Names,
    Networks,
    Port,
    Tokens,
)
from webhook.errors import ConfigError
from webhook.retry import BreakerPolicy, RetryPolicy
from webhook.sinks.config import AnySinkSpec, SinkSpec, environment_sinks, load_sinks, reference_problem

__all__ = ["ConfigError", "Settings"]

DEFAULT_DATABASE_URL = "sqlite:///var/cos-webhook.db"
DEFAULT_CONFIG_PATH = "cos-webhook.toml"
# Where a CVM's CAM role gets its temporary keys (see webhook.ci.credentials).
DEFAULT_CREDENTIALS_URL = "http://metadata.tencentyun.com/latest/meta-data/cam/security-credentials/"

ENVIRONMENT: dict[str, tuple[str, ...]] = {
    "WEBHOOK_DATABASE_URL": ("database_url",),
    "WEBHOOK_CONFIG": ("config_path",),
    "WEBHOOK_CALLBACK_TOKEN": ("callback_tokens",),
    "WEBHOOK_ALLOWED_BUCKETS": ("allowed_buckets",),
    "WEBHOOK_ALLOWED_REGIONS": ("allowed_regions",),
    "WEBHOOK_ALLOWED_TAGS": ("allowed_tags",),
    "COS_SECRET_ID": ("secret_id",),
    "COS_SECRET_KEY": ("secret_key",),
    "COS_SECRET_TOKEN": ("secret_token",),
    "COS_CREDENTIALS_ROLE": ("credentials_role",),
    "WEBHOOK_CREDENTIALS_URL": ("credentials_url",),
    "COS_REGION": ("region",),
    "WEBHOOK_COS_ENDPOINT": ("cos_endpoint",),
    "WEBHOOK_COS_TIMEOUT": ("cos_timeout",),
    "WEBHOOK_SINK_DIR": ("sink_dir",),
    "WEBHOOK_HTTP_SINK_URL": ("http_sink_url",),
    "WEBHOOK_HTTP_SINK_SECRET": ("http_sink_secret",),
    "WEBHOOK_HTTP_SINK_TIMEOUT": ("http_sink_timeout",),
    "WEBHOOK_HTTP_SINK_MODE": ("http_sink_mode",),
    "WEBHOOK_MAX_BODY_BYTES": ("max_body_bytes",),
    "WEBHOOK_MAX_VERSIONS_PER_JOB": ("max_versions_per_job",),
    "WEBHOOK_ALLOWED_SOURCES": ("allowed_sources",),
    "WEBHOOK_TRUSTED_PROXIES": ("trusted_proxies",),
    "WEBHOOK_MAX_ATTEMPTS": ("retry", "max_attempts"),
    "WEBHOOK_BACKOFF_BASE": ("retry", "backoff_base"),
    "WEBHOOK_BACKOFF_CAP": ("retry", "backoff_cap"),
    "WEBHOOK_VERIFY_MAX_AGE": ("verify_retry", "max_age"),
    "WEBHOOK_VERIFY_BACKOFF_CAP": ("verify_retry", "backoff_cap"),
    "WEBHOOK_LEASE_SECONDS": ("lease_seconds",),
    "WEBHOOK_POLL_INTERVAL": ("poll_interval",),
    "WEBHOOK_WORKER_CONCURRENCY": ("worker_concurrency",),
    "WEBHOOK_SINK_CONCURRENCY": ("sink_concurrency",),
    "WEBHOOK_BREAKER_FAILURES": ("breaker", "failures"),
    "WEBHOOK_BREAKER_PAUSE": ("breaker", "pause"),
    "WEBHOOK_RECONCILE_QUEUE_IDS": ("reconcile_queue_ids",),
    "WEBHOOK_RECONCILE_INTERVAL": ("reconcile_interval",),
    "WEBHOOK_RUN_WORKER": ("run_worker_in_web",),
    "WEBHOOK_SHUTDOWN_SECONDS": ("shutdown_seconds",),
    "WEBHOOK_HEARTBEAT_SECONDS": ("heartbeat_seconds",),
    "WEBHOOK_MIN_TRANSFER_RATE": ("min_transfer_rate",),
    "WEBHOOK_STAGING_MAX_BYTES": ("staging_max_bytes",),
    "WEBHOOK_PUBLIC_URL": ("public_url",),
    "WEBHOOK_AUTO_MIGRATE": ("auto_migrate",),
    "WEBHOOK_RETENTION_DAYS": ("retention_days",),
    "WEBHOOK_LOG_FORMAT": ("log_format",),
    "WEBHOOK_METRICS_TOKEN": ("metrics_token",),
    "WEBHOOK_WORKER_METRICS_PORT": ("worker_metrics_port",),
    "WEBHOOK_WORKER_METRICS_DIR": ("worker_metrics_dir",),
    "WEBHOOK_DASHBOARD_PASSWORD": ("dashboard_password",),
    "WEBHOOK_TDMQ_REGION": ("tdmq_region",),
    "WEBHOOK_TDMQ_QUEUE": ("tdmq_queues",),
    "WEBHOOK_TDMQ_ENDPOINT": ("tdmq_endpoint",),
    "TDMQ_SECRET_ID": ("tdmq_secret_id",),
    "TDMQ_SECRET_KEY": ("tdmq_secret_key",),
    "WEBHOOK_TEMP_DIR": ("temp_dir",),
    "WEBHOOK_LOG_LEVEL": ("log_level",),
}
"""Every environment variable and the setting it fills (a path into nested settings)."""

_VARIABLE = {path: name for name, path in ENVIRONMENT.items()}
# The environment that Settings() reads: none unless from_env() says which.
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("environ", default=None)


class Settings(BaseSettings):
    """Everything the processes are configured with; see docs/configuration.md for each variable."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    database_url: DatabaseUrl = DEFAULT_DATABASE_URL
    config_path: str = DEFAULT_CONFIG_PATH
    callback_tokens: Tokens = ()
    allowed_buckets: Names = frozenset()
    allowed_regions: Names = frozenset()  # empty: COS_REGION
    allowed_tags: Names = frozenset({"NoiseReduction"})
    secret_id: str = ""
    secret_key: str = Field("", repr=False)
    secret_token: str = Field("", repr=False)  # with temporary keys
    credentials_role: str = ""  # a CAM role: its keys from the metadata service instead of the three above
    credentials_url: HttpUrl = DEFAULT_CREDENTIALS_URL
    region: str = ""
    cos_endpoint: Endpoint = None
    # Deadline for one whole COS/CI exchange; a transfer also gets its bytes' time at min_transfer_rate.
    cos_timeout: PositiveFloat = 30.0
    sink_dir: str = ""
    http_sink_url: HttpUrl = ""
    http_sink_secret: str = Field("", repr=False)
    http_sink_timeout: PositiveFloat = 30.0  # deadline, as cos_timeout
    http_sink_mode: Literal["json", "multipart"] = "json"  # the event alone, or with the audio inside
    min_transfer_rate: PositiveInt = 1024 * 1024  # bytes/s a transfer may not fall below
    max_body_bytes: PositiveInt = 1024 * 1024
    # Distinct callbacks of one job verified, at most; more are kept unverified (the ledger's MAX_VERSIONS_PER_JOB).
    max_versions_per_job: PositiveInt = 16
    allowed_sources: Networks = ()  # empty: any address
    # X-Forwarded-For hops set by proxies in front (the PaaS router).
    trusted_proxies: Count = 0
    retry: RetryPolicy = RetryPolicy()
    # CI outages and jobs CI still reports running: checked at least every 10 min for a day.
    verify_retry: RetryPolicy = RetryPolicy(max_attempts=1000, backoff_base=5.0, backoff_cap=600.0, max_age=86400.0)
    lease_seconds: PositiveFloat = 300.0
    poll_interval: PositiveFloat = 1.0
    # Jobs in flight per worker process (threads): cloud latency overlaps, one slow sink holds up no other job.
    worker_concurrency: PositiveInt = 8
    # Deliveries in flight per sink and worker (0: half of worker_concurrency): a sink that hangs
    # holds only its own slots, never verification's or another sink's.
    sink_concurrency: Count = 0
    breaker: BreakerPolicy = BreakerPolicy()  # when a failing sink is paused; a sink's own table overrides it
    # The CI queues reconcile lists jobs of; empty: every queue.
    reconcile_queue_ids: NameList = ()
    reconcile_interval: PositiveFloat = 600.0  # seconds between a worker's reconcile runs
    run_worker_in_web: Flag = False
    # Under a PaaS's usual 30 s grace between SIGTERM and SIGKILL.
    shutdown_seconds: PositiveFloat = 25.0
    # A worker whose heartbeat is three intervals old is dead: its leases are taken over.
    heartbeat_seconds: PositiveFloat = 5.0
    staging_max_bytes: PositiveInt = 2 * 1024**3  # downloads kept for a job's pending deliveries
    public_url: HttpUrl = ""  # where CI reaches this service (submit, queue register)
    auto_migrate: Flag = False  # single-process deploys: migrate at start
    retention_days: PositiveFloat = 30.0  # finished jobs older than this are pruned
    # json on a PaaS (stderr is not a terminal), text on a terminal, unless set.
    log_format: Literal["auto", "json", "text"] = "auto"
    metrics_token: str = Field("", repr=False)  # bearer token for /metrics (besides WEBHOOK_ALLOWED_SOURCES)
    worker_metrics_port: Port = None
    worker_metrics_dir: str = ""  # empty: a directory per port in the system's temporary directory
    dashboard_password: str = Field("", repr=False)  # empty: no dashboard (404)
    tdmq_region: str = ""  # sh, bj, gz, cd, hk ...
    tdmq_queues: NameList = ()
    tdmq_endpoint: HttpUrl = ""  # empty: the public endpoint of tdmq_region
    tdmq_secret_id: str = ""  # empty: COS_SECRET_ID
    tdmq_secret_key: str = Field("", repr=False)  # empty: COS_SECRET_KEY
    temp_dir: str = ""
    log_level: LogLevel = "INFO"
    sinks: list[AnySinkSpec] = []  # declared in the file; see sink_specs() for all of them

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            # Every problem at once: fixing a deploy's variables one run at a time is slow.
            raise ConfigError("; ".join(dict.fromkeys(_explain(error) for error in exc.errors()))) from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from ``environ`` (default: the process environment) and the sink file."""
        token = _ENVIRON.set(os.environ if environ is None else environ)
        try:
            return cls()
        finally:
            _ENVIRON.reset(token)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environ = _ENVIRON.get() or {}
        assert isinstance(init_settings, InitSettingsSource)
        return init_settings, _EnvironSource(settings_cls, environ), _SinkFile(settings_cls, init_settings, environ)

    @field_validator("retry", "verify_retry", "breaker", mode="before")
    @classmethod
    def _over_default(cls, value: Any, info: ValidationInfo) -> Any:
        """A policy set in part (one variable) keeps the default's other fields."""
        if isinstance(value, dict) and info.field_name is not None:
            default = cls.model_fields[info.field_name].default
            return default.model_dump() | value
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if not self.allowed_regions and self.region:
            object.__setattr__(self, "allowed_regions", frozenset({self.region}))
        if problem := reference_problem(self.sink_specs()):
            raise ValueError(f"{self.config_path}: {problem}")
        return self

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes``, validated again (and the sink file read again)."""
        return Settings(**(self.model_dump(exclude={"sinks"}, exclude_unset=True) | changes))

    def require_sinks(self) -> list[SinkSpec]:
        """The sinks a worker delivers to; at least one must be configured."""
        if not (specs := self.sink_specs()):
            raise ConfigError(
                "no sink is configured: set WEBHOOK_SINK_DIR or WEBHOOK_HTTP_SINK_URL, "
                f"or declare sinks in {self.config_path} (WEBHOOK_CONFIG)"
            )
        return specs

    def sink_slots(self, spec: SinkSpec) -> int:
        """How many deliveries to ``spec``'s sink a worker runs at once."""
        return spec.concurrency or self.sink_concurrency or max(1, self.worker_concurrency // 2)

    def sink_breaker(self, spec: SinkSpec) -> BreakerPolicy:
        return spec.breaker or self.breaker

    def redact(self, text: str) -> str:
        """``text`` without any configured secret's value (for errors recorded or logged)."""
        for secret in (
            self.secret_key,
            self.secret_token,
            self.http_sink_secret,
            self.metrics_token,
            self.dashboard_password,
            self.tdmq_secret_key,
        ):
            if secret:
                text = text.replace(secret, "[redacted]")
        return text

    def sink_specs(self) -> list[SinkSpec]:
        """Every configured sink: the environment's simple ones, then the file's."""
        return [
            *environment_sinks(
                self.sink_dir, self.http_sink_url, self.http_sink_timeout, self.http_sink_mode, self.retry
            ),
            *self.sinks,
        ]

    def credential_problems(self) -> list[str]:
        """What is wrong with how COS/CI keys are configured: fixed keys, or a CAM role (not both)."""
        fixed = [name for name, value in self._fixed_keys() if value]
        if self.credentials_role:
            if fixed:
                return [f"COS_CREDENTIALS_ROLE and {'/'.join(fixed)} are both set: use the role's keys or fixed ones"]
            return []
        problems = [f"{name} is not set" for name, value in self._fixed_keys()[:2] if not value]
        if self.secret_token and problems:
            problems.append("COS_SECRET_TOKEN is set: it goes with the temporary COS_SECRET_ID and COS_SECRET_KEY")
        return problems

    def _fixed_keys(self) -> tuple[tuple[str, str], ...]:
        return (
            ("COS_SECRET_ID", self.secret_id),
            ("COS_SECRET_KEY", self.secret_key),
            ("COS_SECRET_TOKEN", self.secret_token),
        )

    def check_receiver(self) -> None:
        """What the web process needs."""
        if not self.callback_tokens:
            raise ConfigError("WEBHOOK_CALLBACK_TOKEN is not set (16 to 256 URL-safe characters)")

    def check_worker(self, *, sinks: bool = False) -> None:
        """What the worker needs to verify, fetch and forward (with ``sinks``, at least one sink too);
        every missing setting is named in one error."""
        problems = self.credential_problems()
        if not self.region:
            problems.append("COS_REGION is not set (for example ap-guangzhou)")
        if not self.allowed_buckets:
            problems.append("WEBHOOK_ALLOWED_BUCKETS is not set (comma-separated BucketName-APPID list)")
        if self.http_sink_url and not self.http_sink_secret:
            problems.append("WEBHOOK_HTTP_SINK_SECRET is not set but WEBHOOK_HTTP_SINK_URL is")
        if sinks:
            try:
                self.require_sinks()
            except ConfigError as exc:
                problems.append(str(exc))
        if problems:
            raise ConfigError("; ".join(problems))


class _EnvironSource(PydanticBaseSettingsSource):
    """The variables of :data:`ENVIRONMENT` that are set and not blank, placed where they belong."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads every variable at once

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, path in ENVIRONMENT.items():
            if raw := self._environ.get(name, "").strip():
                *parents, leaf = path
                node = values
                for parent in parents:
                    node = node.setdefault(parent, {})
                node[leaf] = raw
        return values


class _SinkFile(PydanticBaseSettingsSource):
    """The ``sinks`` of the TOML file: ``config_path`` if given, else ``WEBHOOK_CONFIG``, else the default."""

    def __init__(self, settings_cls: type[BaseSettings], init: InitSettingsSource, environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        named = init.init_kwargs.get("config_path") or environ.get("WEBHOOK_CONFIG", "").strip()
        self._path = Path(named or DEFAULT_CONFIG_PATH)
        self._required = bool(named)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads the whole file

    def __call__(self) -> dict[str, Any]:
        if not self._required and not self._path.exists():
            return {}
        try:
            data = tomllib.loads(self._path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"WEBHOOK_CONFIG: {self._path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"WEBHOOK_CONFIG: cannot read {self._path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{self._path}: not valid TOML: {exc}") from None
        return {"sinks": load_sinks(self._path, data)}


def _explain(error: Any) -> str:
    """``WEBHOOK_X must be …, not '…'``: the variable (or setting) and what is wrong with its value."""
    path = tuple(str(part) for part in error["loc"])
    where = _VARIABLE.get(path, ".".join(path))
    kind, context = error["type"], error.get("ctx", {})
    if kind == "value_error":
        reason = str(context.get("error", error["msg"]))
        if not where:
            return reason
        # Our validators say what the value "must be"; a library's own message follows a colon.
        return f"{where} {reason}" if reason.startswith(("must ", "has ")) else f"{where}: {reason}"
    if kind in ("int_parsing", "float_parsing", "int_from_float", "int_type", "float_type"):
        reason = "must be a number"
    elif kind == "greater_than":
        reason = f"must be greater than {context['gt']}"
    elif kind == "greater_than_equal":
        reason = f"must be {context['ge']} or more"
    else:
        reason = str(error["msg"])
    return f"{where} {reason}, not {error['input']!r}"
