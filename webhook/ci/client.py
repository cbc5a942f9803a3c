"""Build the cos-python-sdk-v5 client from settings (public endpoints, a private one, or the sandbox)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from qcloud_cos import CosConfig, CosS3Client
from qcloud_cos.cos_exception import CosClientError, CosServiceError

from webhook.deadline import Deadline, deadline_session

DEFAULT_TIMEOUT = 30.0


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
    secret_id: str,
    secret_key: str,
    region: str,
    endpoint: CosEndpoint | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> CosS3Client:
    """A client for ``region``; with ``endpoint`` every COS and CI request goes to that address.

    The SDK then keeps sending the bucket's virtual host in ``Host`` (and signs it), so a server
    at ``endpoint`` can tell buckets and the COS/CI APIs apart exactly as Tencent's front ends do.

    Its requests go through a :func:`~webhook.deadline.deadline_session`: run a call inside
    :func:`cos_deadline` and ``timeout`` bounds the whole exchange, not just each read.
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
    return CosS3Client(config, retry=1, session=deadline_session())


def client_timeout(client: CosS3Client) -> float:
    """The ``timeout`` the client was made with: the deadline of each of its exchanges."""
    timeout = client.get_conf()._timeout
    return float(timeout) if timeout else DEFAULT_TIMEOUT


def cos_deadline(client: CosS3Client, what: str, timeout: float | None = None) -> Deadline:
    """A :class:`~webhook.deadline.Deadline` for one call of ``client`` (``timeout`` or the client's).

    ::

        with cos_deadline(client, "DescribeMediaJob") as deadline:
            try:
                client.ci_get_media_jobs(...)
            except CosClientError:
                if deadline.expired: ...  # deadline.passed_message() says why
    """
    return Deadline(client_timeout(client) if timeout is None else timeout, what)


def service_error(exc: CosServiceError) -> tuple[str, str]:
    """What COS or CI answered, on one line: (``403 SignatureDoesNotMatch``, ``<message> (request_id=<id>)``).

    The SDK keeps the whole multi-line XML error body; its code, message and request id (the one
    Tencent's support asks for) are what an operator needs.
    """
    digest = exc.get_digest_msg()
    if isinstance(digest, Mapping):  # the parsed <Error>, or for a HEAD (no body) the headers
        fields = [digest.get("code"), digest.get("message"), digest.get("requestid") or digest.get("x-cos-request-id")]
    else:  # a body the SDK could not digest, e.g. CI's <Response> errors, which have no <Resource>
        origin = str(exc.get_origin_msg())
        fields = [_xml_text(origin, name) for name in ("Code", "Message", "RequestId")]
    code, message, request_id = (_first_line(str(field or "")) for field in fields)
    detail = " ".join(filter(None, (message, f"(request_id={request_id or 'unknown'})")))
    return f"{exc.get_status_code()} {code or 'Unknown'}", detail


def client_error(exc: CosClientError) -> str:
    """Why the SDK could not reach COS or CI: the first line of its text (which can hold a whole body)."""
    return _first_line(str(exc), limit=300)


def _first_line(text: str, limit: int = 200) -> str:
    line = (text.strip().splitlines() or [""])[0].strip()
    return line if len(line) <= limit else line[:limit] + "…"


def _xml_text(body: str, element: str) -> str:
    found = re.search(rf"<{element}>([^<]*)</{element}>", body)
    return found.group(1) if found else ""
