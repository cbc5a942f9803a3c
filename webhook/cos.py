"""Build the cos-python-sdk-v5 client from settings (public endpoints, a private one, or the sandbox)."""

from __future__ import annotations

from qcloud_cos import CosConfig, CosS3Client

from webhook.config import CosEndpoint


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
