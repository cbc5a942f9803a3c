"""The one way to COS and CI: cos-python-sdk-v5 clients, and the SDK's errors in our own words.

:func:`source_client` builds every SDK client the product uses (public endpoints, a private one,
or the sandbox), signing with a :mod:`~webhook.ci.credentials` source's keys; :func:`make_client`
is one with fixed keys, :func:`client_for` the service's own, from its settings, and
:func:`signer_for` the one that presigns URLs for others. :func:`cloud_error` is the one reading of what the SDK
raises (:data:`SDK_ERRORS`): each stage puts its line into its own error (``VerifyError``,
``FetchError``, ``SubmitError``, ``ReconcileError``, a sink's ``DeliveryError``).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from qcloud_cos import CosConfig, CosS3Client
from qcloud_cos.cos_exception import CosClientError, CosServiceError

from webhook.ci.credentials import Credentials, CredentialSource, StaticCredentials, credentials_for
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
    token: str = "",
) -> CosS3Client:
    """A client for ``region`` with fixed keys (and ``token``, for temporary ones); see :func:`source_client`."""
    return source_client(StaticCredentials(Credentials(secret_id, secret_key, token)), region, endpoint, timeout)


def source_client(
    source: CredentialSource,
    region: str,
    endpoint: CosEndpoint | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> CosS3Client:
    """A client for ``region`` signing each request with ``source``'s current keys; with
    ``endpoint`` every COS and CI request goes to that address.

    The SDK then keeps sending the bucket's virtual host in ``Host`` (and signs it), so a server
    at ``endpoint`` can tell buckets and the COS/CI APIs apart exactly as Tencent's front ends do.

    Its requests go through a :func:`~webhook.deadline.deadline_session`: run a call inside
    :func:`cos_deadline` and ``timeout`` bounds the whole exchange, not just each read.
    """
    place: dict[str, Any] = {"Scheme": "https"}
    if endpoint is not None:
        place = {"Scheme": endpoint.scheme, "IP": endpoint.host, "Port": endpoint.port}
    config = _Config(Region=region, CredentialInstance=_RequestCredentials(source), Timeout=timeout, **place)
    return CosS3Client(config, retry=1, session=deadline_session())


def client_for(settings: Settings, region: str | None = None) -> CosS3Client:
    """The service's client for ``region`` (default ``COS_REGION``): its own credentials (fixed, or
    its CAM role's), through ``WEBHOOK_COS_ENDPOINT`` when that is set, each exchange bounded by
    ``WEBHOOK_COS_TIMEOUT``."""
    source = credentials_for(settings)
    return source_client(source, region or settings.region, settings.cos_endpoint, settings.cos_timeout)


def signer_for(settings: Settings, region: str) -> CosS3Client:
    """A client that only presigns URLs for others to use, with the service's own credentials
    (fixed, or its CAM role's).

    A presigned URL must name the bucket's own host (``<bucket>.cos.<region>.myqcloud.com``), which
    its signature covers: a client aimed at an endpoint override's address would put that address
    there instead, so this one never is (against the sandbox, ``Sandbox.request_target`` sends the
    URL there).
    """
    return source_client(credentials_for(settings), region)


def signing_token(client: CosS3Client) -> str:
    """The token of the keys this thread's last signature with ``client`` used ("" for permanent keys).

    A presigned URL made with temporary keys works only with it: the SDK does not add it to the
    URL, so :func:`webhook.ci.fetch.presigned_url` does.
    """
    keys = getattr(client.get_conf(), "_credential_inst", None)  # None: a client not made here
    return keys.token or "" if isinstance(keys, _RequestCredentials) else ""


class _RequestCredentials:
    """The SDK's ``CredentialInstance`` hook over a :class:`CredentialSource`, one set of keys per request.

    cos-python-sdk-v5 (1.9.x) reads ``secret_id`` and then ``secret_key`` when it signs a request
    (``cos_auth.CosS3Auth.__init__``, on the caller's thread), then the token when it sends it
    (``CosS3Client.send_request`` reads ``CosConfig._token``, which :class:`_Config` takes from
    here). Reading ``secret_id`` takes the source's current keys and pins them for this thread;
    the key and token are the pinned set's, so a refresh between those reads cannot make a
    request carry the old id with the new key or token.
    """

    def __init__(self, source: CredentialSource) -> None:
        self._source = source
        self._pinned = threading.local()

    @property
    def secret_id(self) -> str:
        credentials = self._source.current()
        self._pinned.credentials = credentials
        return credentials.secret_id

    @property
    def secret_key(self) -> str:
        return self._pin().secret_key

    @property
    def token(self) -> str | None:
        return self._pin().token or None

    def _pin(self) -> Credentials:
        pinned: Credentials | None = getattr(self._pinned, "credentials", None)
        return pinned if pinned is not None else self._source.current()


class _Config(CosConfig):  # type: ignore[misc]
    """A ``CosConfig`` whose token is the current request's (see :class:`_RequestCredentials`):
    the SDK only reads keys from a ``CredentialInstance``, never its token."""

    @property
    def _token(self) -> str | None:
        keys = self.__dict__.get("_credential_inst")
        return keys.token if isinstance(keys, _RequestCredentials) else None

    @_token.setter
    def _token(self, value: str | None) -> None:
        # CosConfig.__init__ stores its Token argument (None here): the token is the source's.
        if value is not None:
            raise ValueError("this client's token comes from its credential source")


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
