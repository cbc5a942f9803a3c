"""The one way to COS and CI: cos-python-sdk-v5 clients, and the SDK's errors in our own words.

:func:`make_client` builds every SDK client the product uses (public endpoints, a private one,
or the sandbox); :func:`client_for` is the service's own, from its settings, and :func:`signer`
the one that presigns URLs for others. :func:`cloud_error` is the one reading of what the SDK
raises (:data:`SDK_ERRORS`): each stage puts its line into its own error (``VerifyError``,
``FetchError``, ``SubmitError``, ``ReconcileError``, a sink's ``DeliveryError``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeAlias

from qcloud_cos import CosConfig, CosS3Client
from qcloud_cos.cos_exception import CosClientError, CosServiceError

from webhook.config import Settings
from webhook.config_values import CosEndpoint
from webhook.deadline import DEFAULT_TIMEOUT, Deadline, current, deadline_session

SDK_ERRORS = (CosServiceError, CosClientError)
"""What an SDK call raises: COS or CI answered with an error, or no answer came."""
Client: TypeAlias = CosS3Client  # what the rest of the service holds: a client made here, passed to ci's calls
ClientFactory = Callable[[str], Client]  # a region's client


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


def client_for(settings: Settings, region: str | None = None) -> CosS3Client:
    """The service's client for ``region`` (default ``COS_REGION``): its own credentials, through
    ``WEBHOOK_COS_ENDPOINT`` when that is set, each exchange bounded by ``WEBHOOK_COS_TIMEOUT``."""
    return make_client(
        settings.secret_id, settings.secret_key, region or settings.region, settings.cos_endpoint, settings.cos_timeout
    )


def signer(secret_id: str, secret_key: str, region: str) -> CosS3Client:
    """A client that only presigns URLs, for others to use.

    A presigned URL must name the bucket's own host (``<bucket>.cos.<region>.myqcloud.com``), which
    its signature covers: a client aimed at an endpoint override's address would put that address
    there instead, so this one never is (against the sandbox, ``Sandbox.request_target`` sends the
    URL there).
    """
    return make_client(secret_id, secret_key, region)


def client_timeout(client: CosS3Client) -> float:
    """The ``timeout`` the client was made with: the deadline of each of its exchanges."""
    timeout = client.get_conf()._timeout
    return float(timeout) if timeout else DEFAULT_TIMEOUT


def cos_deadline(client: CosS3Client, what: str, timeout: float | None = None) -> Deadline:
    """A :class:`~webhook.deadline.Deadline` for one call of ``client`` (``timeout`` or the client's).

    ``what`` names the call as error lines do (``CI API``, ``COS GetObject <key>``): a call that
    runs out of time fails with ``<what>: <why>`` (see :func:`cloud_error`). ::

        with cos_deadline(client, "CI API"):
            try:
                client.ci_get_media_jobs(...)
            except SDK_ERRORS as exc:
                raise VerifyError(str(cloud_error(exc, CI))) from None
    """
    return Deadline(client_timeout(client) if timeout is None else timeout, what)


@dataclass(frozen=True)
class Api:
    """Who answers a call (``CI``, ``COS``), and how a call that reached nothing names where it went."""

    name: str
    address: str


CI = Api("CI", "CI API")
COS = Api("COS", "COS")


class CloudError(Exception):
    """A COS or CI call that failed, as one line (the SDK's own text can hold whole bodies and retry logs).

    ``status``, ``code`` and ``message`` are what COS or CI answered: None, "" and "" when no
    answer came (unreachable, or out of time).
    """

    def __init__(self, line: str, status: int | None = None, code: str = "", message: str = "") -> None:
        super().__init__(line)
        self.status = status
        self.code = code
        self.message = message


def cloud_error(exc: CosServiceError | CosClientError, api: Api, subject: str = "") -> CloudError:
    """What the SDK raised, as a :class:`CloudError` whose line is one of:

    - ``<api> answered <status> <code>[ for <subject>]: <message> (request_id=<id>)``;
    - ``<what the current deadline names>: <why it passed>``, for a call that ran out of time;
    - ``<api address> unreachable: <the first line of the SDK's text>``.
    """
    if isinstance(exc, CosServiceError):
        code, message, _ = _answer(exc)
        status, detail = service_error(exc)
        about = f" for {subject}" if subject else ""
        return CloudError(f"{api.name} answered {status}{about}: {detail}", exc.get_status_code(), code, message)
    deadline = current()
    if deadline is not None and deadline.expired:
        return CloudError(f"{deadline.what}: {deadline.passed_message()}")
    return CloudError(f"{api.address} unreachable: {client_error(exc)}")


def service_error(exc: CosServiceError) -> tuple[str, str]:
    """What COS or CI answered, on one line: (``403 SignatureDoesNotMatch``, ``<message> (request_id=<id>)``).

    The SDK keeps the whole multi-line XML error body; its code, message and request id (the one
    Tencent's support asks for) are what an operator needs.
    """
    code, message, request_id = _answer(exc)
    detail = " ".join(filter(None, (message, f"(request_id={request_id or 'unknown'})")))
    return f"{exc.get_status_code()} {code or 'Unknown'}", detail


def client_error(exc: CosClientError) -> str:
    """Why the SDK could not reach COS or CI: the first line of its text (which can hold a whole body)."""
    return _first_line(str(exc), limit=300)


def _answer(exc: CosServiceError) -> tuple[str, str, str]:
    """The error answer's code, message and request id, each on one line ("" when it has none)."""
    digest = exc.get_digest_msg()
    if isinstance(digest, Mapping):  # the parsed <Error>, or for a HEAD (no body) the headers
        fields = [digest.get("code"), digest.get("message"), digest.get("requestid") or digest.get("x-cos-request-id")]
    else:  # a body the SDK could not digest, e.g. CI's <Response> errors, which have no <Resource>
        origin = str(exc.get_origin_msg())
        fields = [_xml_text(origin, name) for name in ("Code", "Message", "RequestId")]
    code, message, request_id = (_first_line(str(field or "")) for field in fields)
    return code, message, request_id


def _first_line(text: str, limit: int = 200) -> str:
    line = (text.strip().splitlines() or [""])[0].strip()
    return line if len(line) <= limit else line[:limit] + "…"


def _xml_text(body: str, element: str) -> str:
    found = re.search(rf"<{element}>([^<]*)</{element}>", body)
    return found.group(1) if found else ""
