"""How the text of environment variables becomes typed settings: one annotated type per kind of value.

Each validator takes what the environment (or a settings file) gives and raises ``ValueError``
with a message that :mod:`webhook.config` puts after the variable's name.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, NonNegativeInt

_TOKEN = re.compile(r"[A-Za-z0-9._~-]{16,256}")


@dataclass(frozen=True)
class CosEndpoint:
    """Where the SDK sends requests instead of the public endpoints (sandbox, private link)."""

    scheme: str
    host: str
    port: int | None


def parse_endpoint(url: str) -> CosEndpoint:
    """``scheme://host[:port]`` as the SDK needs it; :class:`ValueError` saying what is wrong otherwise."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    if parts.path not in ("", "/"):
        raise ValueError("must be scheme://host[:port] with no path")
    return CosEndpoint(scheme=parts.scheme, host=parts.hostname, port=port)


def _names(value: Any) -> Any:
    """A comma-separated list, as environment variables write one."""
    return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


def _tokens(value: Any) -> Any:
    tokens = _names(value)
    if any(not _TOKEN.fullmatch(str(token)) for token in tokens):
        raise ValueError("must be 16 to 256 characters from A-Z a-z 0-9 . _ ~ -")
    return tokens


def _database_url(value: Any) -> Any:
    url = str(value)
    scheme = url.split(":", 1)[0]
    if scheme in ("postgres", "postgresql"):
        # PaaS add-ons hand out postgres:// URLs; SQLAlchemy needs the driver named.
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if scheme not in ("sqlite", "postgresql+psycopg"):
        raise ValueError(f"must be a sqlite:/// or postgresql:// URL, not {scheme!r}")
    return url


def _http_url(value: Any) -> Any:
    if value and not re.match(r"https?://[^/\s:]", str(value)):
        raise ValueError("must be an http:// or https:// URL")
    return value


def _endpoint(value: Any) -> Any:
    return parse_endpoint(value) if isinstance(value, str) else value


def _networks(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    return [ipaddress.ip_network(part, strict=False) for part in _names(value)]


def _count(value: Any) -> Any:
    if isinstance(value, str) and not value.isdigit():
        raise ValueError(f"must be a whole number (0 or more), not {value!r}")
    return value


def _flag(value: Any) -> Any:
    if isinstance(value, str):
        if value.lower() in ("0", "false", "no", "off"):
            return False
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        raise ValueError(f"must be true or false, not {value!r}")
    return value


def _port(value: Any) -> Any:
    if isinstance(value, str) and not (value.isdigit() and 0 < int(value) < 65536):
        raise ValueError(f"must be a TCP port, 1 to 65535, not {value!r}")
    return value


def _level(value: Any) -> Any:
    level = str(value).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"must be one of DEBUG, INFO, WARNING, ERROR, not {level!r}")
    return level


Names = Annotated[frozenset[str], BeforeValidator(_names)]
NameList = Annotated[tuple[str, ...], BeforeValidator(_names)]
Tokens = Annotated[tuple[str, ...], BeforeValidator(_tokens)]
DatabaseUrl = Annotated[str, BeforeValidator(_database_url)]
HttpUrl = Annotated[str, BeforeValidator(_http_url)]
Endpoint = Annotated[CosEndpoint | None, BeforeValidator(_endpoint)]
Networks = Annotated[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], BeforeValidator(_networks)]
Count = Annotated[NonNegativeInt, BeforeValidator(_count)]
Flag = Annotated[bool, BeforeValidator(_flag)]
Port = Annotated[int | None, BeforeValidator(_port)]
LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_level)]
