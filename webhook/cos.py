"""Build the cos-python-sdk-v5 client from settings (public endpoints, a private one, or the sandbox)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from qcloud_cos import CosConfig, CosS3Client


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


def make_client(
    secret_id: str, secret_key: str, region: str, endpoint: CosEndpoint | None = None, timeout: float = 30.0
) -> CosS3Client:
    """A client for ``region``; with ``endpoint`` every COS and CI request goes to that address.

    The SDK then keeps sending the bucket's virtual host in ``Host`` (and signs it), so a server
    at ``endpoint`` can tell buckets and the COS/CI APIs apart exactly as Tencent's front ends do.
    """
    if endpoint is None:
        config = CosConfig(Region=region, SecretId=secret_id, SecretKey=secret_key, Scheme="https", Timeout=timeout)
    else:
        config = CosConfig(
            Region=region,
            SecretId=secret_id,
            SecretKey=secret_key,
            Scheme=endpoint.scheme,
            IP=endpoint.host,
            Port=endpoint.port,
            Timeout=timeout,
        )
    return CosS3Client(config, retry=1)
