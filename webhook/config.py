"""Settings, read from environment variables and checked once at start-up."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit


class ConfigError(Exception):
    """A missing or invalid setting; the message names the variable."""


_TOKEN = re.compile(r"[A-Za-z0-9._~-]{16,256}")
DEFAULT_DATABASE_URL = "sqlite:///var/cos-webhook.db"
DEFAULT_CONFIG_PATH = "cos-webhook.toml"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failing step is retried."""

    max_attempts: int = 8
    backoff_base: float = 2.0
    backoff_cap: float = 600.0
    max_age: float | None = None  # seconds after the callback arrived; past it, no more retries


@dataclass(frozen=True)
class CosEndpoint:
    """Where the SDK sends requests instead of the public endpoints (sandbox, private link)."""

    scheme: str
    host: str
    port: int | None


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    config_path: str = DEFAULT_CONFIG_PATH
    config_path_explicit: bool = False  # set by WEBHOOK_CONFIG: then the file must exist
    callback_tokens: tuple[str, ...] = ()
    allowed_buckets: frozenset[str] = frozenset()
    allowed_regions: frozenset[str] = frozenset()
    allowed_tags: frozenset[str] = frozenset({"NoiseReduction"})
    secret_id: str = ""
    secret_key: str = field(default="", repr=False)
    region: str = ""
    cos_endpoint: CosEndpoint | None = None
    cos_timeout: float = 30.0  # seconds per COS/CI connect or read
    sink_dir: str = ""
    http_sink_url: str = ""
    http_sink_secret: str = field(default="", repr=False)
    http_sink_timeout: float = 30.0
    max_body_bytes: int = 1024 * 1024
    allowed_sources: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # empty: any address
    trusted_proxies: int = 0  # X-Forwarded-For hops set by proxies in front (the PaaS router)
    retry: RetryPolicy = RetryPolicy()
    verify_retry: RetryPolicy = RetryPolicy(max_attempts=30, backoff_base=5.0, backoff_cap=300.0)
    lease_seconds: float = 300.0
    poll_interval: float = 1.0
    run_worker_in_web: bool = False
    temp_dir: str = ""
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every setting; raise :class:`ConfigError` naming the first bad one."""
        e = _Env(os.environ if env is None else env)
        region = e.text("COS_REGION")
        return cls(
            database_url=e.database_url("WEBHOOK_DATABASE_URL"),
            config_path=e.text("WEBHOOK_CONFIG", DEFAULT_CONFIG_PATH),
            config_path_explicit=bool(e.text("WEBHOOK_CONFIG")),
            callback_tokens=e.tokens("WEBHOOK_CALLBACK_TOKEN"),
            allowed_buckets=e.names("WEBHOOK_ALLOWED_BUCKETS"),
            allowed_regions=e.names("WEBHOOK_ALLOWED_REGIONS") or frozenset({region} - {""}),
            allowed_tags=e.names("WEBHOOK_ALLOWED_TAGS") or frozenset({"NoiseReduction"}),
            secret_id=e.text("COS_SECRET_ID"),
            secret_key=e.text("COS_SECRET_KEY"),
            region=region,
            cos_endpoint=e.endpoint("WEBHOOK_COS_ENDPOINT"),
            cos_timeout=e.number("WEBHOOK_COS_TIMEOUT", 30.0),
            sink_dir=e.text("WEBHOOK_SINK_DIR"),
            http_sink_url=e.http_url("WEBHOOK_HTTP_SINK_URL"),
            http_sink_secret=e.text("WEBHOOK_HTTP_SINK_SECRET"),
            http_sink_timeout=e.number("WEBHOOK_HTTP_SINK_TIMEOUT", 30.0),
            max_body_bytes=int(e.number("WEBHOOK_MAX_BODY_BYTES", 1024 * 1024)),
            allowed_sources=e.networks("WEBHOOK_ALLOWED_SOURCES"),
            trusted_proxies=e.count("WEBHOOK_TRUSTED_PROXIES"),
            retry=RetryPolicy(
                max_attempts=int(e.number("WEBHOOK_MAX_ATTEMPTS", 8)),
                backoff_base=e.number("WEBHOOK_BACKOFF_BASE", 2.0),
                backoff_cap=e.number("WEBHOOK_BACKOFF_CAP", 600.0),
            ),
            lease_seconds=e.number("WEBHOOK_LEASE_SECONDS", 300.0),
            poll_interval=e.number("WEBHOOK_POLL_INTERVAL", 1.0),
            run_worker_in_web=e.flag("WEBHOOK_RUN_WORKER"),
            temp_dir=e.text("WEBHOOK_TEMP_DIR"),
            log_level=e.choice("WEBHOOK_LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO"),
        )

    def check_receiver(self) -> None:
        """What the web process needs."""
        if not self.callback_tokens:
            raise ConfigError("WEBHOOK_CALLBACK_TOKEN is not set (16 to 256 URL-safe characters)")

    def check_worker(self) -> None:
        """What the worker needs to verify, fetch and forward."""
        for name, value in (("COS_SECRET_ID", self.secret_id), ("COS_SECRET_KEY", self.secret_key)):
            if not value:
                raise ConfigError(f"{name} is not set")
        if not self.region:
            raise ConfigError("COS_REGION is not set (for example ap-guangzhou)")
        if not self.allowed_buckets:
            raise ConfigError("WEBHOOK_ALLOWED_BUCKETS is not set (comma-separated BucketName-APPID list)")
        if self.http_sink_url and not self.http_sink_secret:
            raise ConfigError("WEBHOOK_HTTP_SINK_SECRET is not set but WEBHOOK_HTTP_SINK_URL is")


class _Env:
    """Typed readers that name the variable in every error."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str, default: str = "") -> str:
        return self._env.get(name, "").strip() or default

    def names(self, name: str) -> frozenset[str]:
        return frozenset(part.strip() for part in self.text(name).split(",") if part.strip())

    def tokens(self, name: str) -> tuple[str, ...]:
        tokens = tuple(part.strip() for part in self.text(name).split(",") if part.strip())
        for token in tokens:
            if not _TOKEN.fullmatch(token):
                raise ConfigError(f"{name} must be 16 to 256 characters from A-Z a-z 0-9 . _ ~ -")
        return tokens

    def number(self, name: str, default: float) -> float:
        raw = self.text(name)
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, not {raw!r}") from None
        if value <= 0:
            raise ConfigError(f"{name} must be greater than 0, not {raw!r}")
        return value

    def count(self, name: str) -> int:
        raw = self.text(name, "0")
        if not raw.isdigit():
            raise ConfigError(f"{name} must be a whole number (0 or more), not {raw!r}")
        return int(raw)

    def networks(self, name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        try:
            return tuple(ipaddress.ip_network(part, strict=False) for part in self.names(name))
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None

    def flag(self, name: str) -> bool:
        raw = self.text(name).lower()
        if raw in ("", "0", "false", "no", "off"):
            return False
        if raw in ("1", "true", "yes", "on"):
            return True
        raise ConfigError(f"{name} must be true or false, not {raw!r}")

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        raw = self.text(name, default).upper()
        if raw not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {raw!r}")
        return raw

    def database_url(self, name: str) -> str:
        url = self.text(name, DEFAULT_DATABASE_URL)
        scheme = url.split(":", 1)[0]
        if scheme in ("postgres", "postgresql"):
            # PaaS add-ons hand out postgres:// URLs; SQLAlchemy needs the driver named.
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        elif scheme not in ("sqlite", "postgresql+psycopg"):
            raise ConfigError(f"{name} must be a sqlite:/// or postgresql:// URL, not {scheme!r}")
        return url

    def http_url(self, name: str) -> str:
        url = self.text(name)
        if url:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"{name} must be an http:// or https:// URL")
        return url

    def endpoint(self, name: str) -> CosEndpoint | None:
        url = self.http_url(name)
        return parse_endpoint(url, name) if url else None


def parse_endpoint(url: str, name: str) -> CosEndpoint:
    """``scheme://host[:port]`` as the SDK needs it; :class:`ConfigError` names ``name`` otherwise."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{name} has an invalid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must be an http:// or https:// URL")
    if parts.path not in ("", "/"):
        raise ConfigError(f"{name} must be scheme://host[:port] with no path")
    return CosEndpoint(scheme=parts.scheme, host=parts.hostname, port=port)
