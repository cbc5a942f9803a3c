"""Who may call the sandbox: its permanent keys, the temporary keys it issues, and the actions it denies.

:class:`Keyring` issues a CAM role's temporary keys at :data:`ROLE_PATH` (on a host that names no
bucket), shaped as a CVM's metadata service serves them (see :mod:`webhook.ci.credentials`), each
valid for :attr:`Keyring.lifetime` seconds. A request signed with temporary keys is accepted only
with their token (``x-cos-security-token``; ``x-ci-security-token`` for CI calls, as the SDK
sends them; the ``x-cos-security-token`` parameter of a presigned URL) and only before they expire.

:meth:`Keyring.deny` makes the sandbox answer ``403 AccessDenied`` to one CAM action
(``cos:GetObject``, ``ci:DescribeMediaJobs`` …) for one principal (a permanent SecretId, or the
role, for all of its temporary keys) or for everyone, as a policy without that action would.

The error codes are COS's for an unknown SecretId (``InvalidAccessKeyId``) and, for an expired
token, ``ExpiredToken`` as S3 names it: Tencent's error table could not be checked for the latter.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from werkzeug.wrappers import Request, Response

from webhook.dev.sandbox.responses import ApiError, json_response
from webhook.dev.sandbox.signing import SignatureError

ROLE_PATH = "/latest/meta-data/cam/security-credentials/"
EVERYONE = "*"


@dataclass(frozen=True)
class TemporaryKeys:
    secret_id: str
    secret_key: str
    token: str
    expires_at: int  # unix seconds, as ExpiredTime

    def document(self) -> dict[str, object]:
        """The metadata service's JSON for these keys."""
        expiration = datetime.fromtimestamp(self.expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {
            "TmpSecretId": self.secret_id,
            "TmpSecretKey": self.secret_key,
            "Token": self.token,
            "ExpiredTime": self.expires_at,
            "Expiration": expiration,
            "Code": "Success",
        }


class Keyring:
    """The keys the sandbox accepts and the actions it denies; thread-safe."""

    def __init__(
        self,
        secret_id: str,
        secret_key: str,
        *,
        role: str = "",
        lifetime: float = 1800.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.secret_id = secret_id
        self.secret_key = secret_key
        # A name of its own by default: a process keeps one source per role and URL, and a later
        # sandbox on a port used before must not inherit the keys an earlier one issued.
        self.role = role or f"sandbox-role-{secrets.token_hex(4)}"
        self.lifetime = lifetime
        """Seconds each set of temporary keys issued from now on is valid for (at least 1)."""
        self._clock = clock
        self._lock = threading.Lock()
        self._issued: dict[str, TemporaryKeys] = {}
        self._denied: set[tuple[str, str]] = set()

    def issue(self) -> TemporaryKeys:
        """New temporary keys for the role."""
        keys = TemporaryKeys(
            "tmp-" + secrets.token_hex(8),
            secrets.token_hex(16),
            secrets.token_urlsafe(24),
            int(self._clock() + max(self.lifetime, 1.0)),
        )
        with self._lock:
            self._issued[keys.secret_id] = keys
        return keys

    @property
    def issued(self) -> list[TemporaryKeys]:
        """Every set of temporary keys issued so far, oldest first."""
        with self._lock:
            return list(self._issued.values())

    def signing_key(self, secret_id: str, token: str) -> str:
        """The SecretKey a request from ``secret_id`` carrying ``token`` must be signed with;
        :class:`SignatureError` when the id is unknown, the token is not its own, or it expired."""
        if secret_id == self.secret_id:
            return self.secret_key  # permanent keys need no token (one sent along is not checked)
        with self._lock:
            keys = self._issued.get(secret_id)
        if keys is None:
            raise SignatureError("InvalidAccessKeyId", f"the SecretId {secret_id!r} is not known to this sandbox")
        if not token:
            raise SignatureError("InvalidAccessKeyId", f"the temporary SecretId {secret_id!r} came without its token")
        if not secrets.compare_digest(token, keys.token):
            raise SignatureError("InvalidAccessKeyId", f"the security token is not the one of SecretId {secret_id!r}")
        if self._clock() >= keys.expires_at:
            raise SignatureError("ExpiredToken", "the provided token has expired")
        return keys.secret_key

    def principal(self, secret_id: str) -> str:
        """Who ``secret_id`` acts as: the role for its temporary keys, else the SecretId itself."""
        with self._lock:
            return self.role if secret_id in self._issued else secret_id

    def deny(self, action: str, principal: str = EVERYONE) -> None:
        """Answer ``403 AccessDenied`` to ``action`` (``cos:GetObject`` …) from ``principal``."""
        with self._lock:
            self._denied.add((action, principal))

    def allow_all(self) -> None:
        with self._lock:
            self._denied.clear()

    def authorize(self, action: str, secret_id: str) -> None:
        """:class:`ApiError` 403 when ``action`` is denied to whoever ``secret_id`` is."""
        principal = self.principal(secret_id)
        with self._lock:
            denied = (action, EVERYONE) in self._denied or (action, principal) in self._denied
        if denied:
            raise ApiError(403, "AccessDenied", f"Access Denied. ({action} is not allowed for {principal})")

    def metadata(self, request: Request) -> Response:
        """GET :data:`ROLE_PATH` names the role; GET ``ROLE_PATH + role`` issues its keys."""
        if request.method != "GET":
            return json_response({"error": f"{request.method} is not allowed here"}, 405)
        role = request.path[len(ROLE_PATH) :]
        if not role:
            return Response(self.role, content_type="text/plain")
        if role != self.role:
            return json_response({"Code": "NotFound", "error": f"no role {role!r} is bound to this sandbox"}, 404)
        return json_response(self.issue().document())
