"""Where the SDK's keys come from: fixed keys (with a token, for temporary ones), or a CAM role's
temporary keys from the instance metadata service, refreshed before they expire.

:func:`credentials_for` picks the source the settings describe; :mod:`webhook.ci.client` hands it
to every client it makes, so a refresh reaches all of them without a restart.

A CVM (or TKE node) with a CAM role serves that role's temporary keys at
``http://metadata.tencentyun.com/latest/meta-data/cam/security-credentials/<RoleName>``, as JSON::

    {"TmpSecretId": "...", "TmpSecretKey": "...", "Token": "...", "ExpiredTime": 1700000000,
     "Expiration": "2023-11-14T22:13:20Z", "Code": "Success"}

The URL, the field names, ``Code == "Success"`` and ``ExpiredTime`` in unix seconds are those
tencentcloud-sdk-python's ``CVMRoleCredential`` (tencentcloud/common/credential.py) and
tencentcloud-sdk-nodejs's ``CvmRoleCredential`` rely on; both cite Tencent's CAM document 598/85616.
That SDK refreshes when fewer than 300 s are left; so does this source (or at half the keys' life
when they live shorter, as the sandbox's do).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

import requests
from qcloud_cos.cos_exception import CosClientError

from webhook.config import Settings

log = logging.getLogger(__name__)

REFRESH_BEFORE = 300.0  # seconds before ExpiredTime that new keys are fetched
RETRY_SECONDS = 5.0  # after a failed refresh while the old keys still work
FETCH_TIMEOUT = 5.0  # the metadata service is on the host's own network: it answers at once or not at all


@dataclass(frozen=True)
class Credentials:
    """One set of keys; ``token`` only for temporary keys, ``expires_at`` (unix seconds) only for fetched ones."""

    secret_id: str
    secret_key: str
    token: str = ""
    expires_at: float | None = None

    def __repr__(self) -> str:  # the key and token are secrets: never in a log line or traceback
        return f"Credentials(secret_id={self.secret_id!r}, expires_at={self.expires_at!r})"


class CredentialSource(Protocol):
    """What a client asks for the keys of each request it signs."""

    def current(self) -> Credentials: ...


class CredentialsError(CosClientError):  # type: ignore[misc]
    """No usable keys: the role's could not be fetched and the old ones expired.

    A :class:`~qcloud_cos.cos_exception.CosClientError`, so every caller already handling the
    SDK's errors (``SDK_ERRORS``) reports and retries it like an unreachable COS.
    """


@dataclass(frozen=True)
class StaticCredentials:
    """``COS_SECRET_ID``/``COS_SECRET_KEY`` (and ``COS_SECRET_TOKEN``): the same keys for ever."""

    credentials: Credentials

    def current(self) -> Credentials:
        return self.credentials


class RoleCredentials:
    """A CAM role's temporary keys, fetched from the metadata service and refreshed before they expire.

    Thread-safe: one thread fetches while the others keep signing with the old keys; only when
    there are none, or they expired, do the others wait for the fetch. A failed refresh is logged
    and tried again after :data:`RETRY_SECONDS`; the old keys are used until they expire, then
    every request raises :class:`CredentialsError` until a fetch succeeds.
    """

    def __init__(
        self,
        role: str,
        base_url: str,
        *,
        clock: Callable[[], float] = time.time,
        session: requests.Session | None = None,
    ) -> None:
        self.role = role
        self.url = base_url.rstrip("/") + "/" + quote(role, safe="")
        self._clock = clock
        self._session = session or requests.Session()
        self._lock = threading.Lock()
        self._credentials: Credentials | None = None
        self._fetched_at = 0.0
        self._retry_at = 0.0
        self.fetches = 0  # successful ones: how many sets of keys this process has used

    def current(self) -> Credentials:
        credentials, now = self._credentials, self._clock()
        if credentials is not None and now < self._refresh_at(credentials):
            return credentials
        if credentials is not None and now < _expiry(credentials):
            # Still valid: refresh unless another thread is at it, or a failure is too recent.
            if now >= self._retry_at and self._lock.acquire(blocking=False):
                try:
                    self._refresh(credentials)
                finally:
                    self._lock.release()
            return self._credentials or credentials
        with self._lock:  # none, or expired: every caller needs the fetch
            credentials = self._credentials
            if credentials is None or self._clock() >= _expiry(credentials):
                return self._fetch()
            return credentials

    def _refresh_at(self, credentials: Credentials) -> float:
        expires_at = _expiry(credentials)
        return expires_at - min(REFRESH_BEFORE, (expires_at - self._fetched_at) / 2)

    def _refresh(self, old: Credentials) -> None:
        try:
            self._fetch()
        except CredentialsError as exc:
            self._retry_at = self._clock() + RETRY_SECONDS
            left = _expiry(old) - self._clock()
            log.warning("credentials: refreshing role %s failed, its keys expire in %.0fs: %s", self.role, left, exc)

    def _fetch(self) -> Credentials:
        """Fetch new keys (the lock held) and make them current; :class:`CredentialsError` if none came."""
        try:
            with self._session.get(self.url, timeout=FETCH_TIMEOUT) as response:
                status, body = response.status_code, response.text
        except requests.RequestException as exc:
            raise CredentialsError(f"role {self.role}: {self.url} unreachable: {type(exc).__name__}") from None
        if status != 200:
            raise CredentialsError(f"role {self.role}: {self.url} answered {status}")
        credentials = _parse(self.role, body)
        self._credentials, self._fetched_at, self._retry_at = credentials, self._clock(), 0.0
        self.fetches += 1
        log.info("credentials: role %s keys %s until %d", self.role, credentials.secret_id, credentials.expires_at)
        return credentials


def _expiry(credentials: Credentials) -> float:
    return credentials.expires_at if credentials.expires_at is not None else float("inf")


def _parse(role: str, body: str) -> Credentials:
    try:
        data = json.loads(body)
        if data.get("Code") != "Success":
            raise CredentialsError(f"role {role}: the metadata service answered Code {data.get('Code')!r}")
        return Credentials(
            str(data["TmpSecretId"]), str(data["TmpSecretKey"]), str(data["Token"]), float(data["ExpiredTime"])
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # Never the body in the message: it holds the keys.
        raise CredentialsError(f"role {role}: the metadata service's answer is not credentials ({exc!r:.80})") from None


_ROLES: dict[tuple[str, str], RoleCredentials] = {}
_ROLES_LOCK = threading.Lock()


def credentials_for(settings: Settings) -> CredentialSource:
    """The source the settings name: ``COS_CREDENTIALS_ROLE``'s keys (one source per process for
    each role, so every client shares its fetches), else the fixed keys."""
    if not settings.credentials_role:
        return StaticCredentials(Credentials(settings.secret_id, settings.secret_key, settings.secret_token))
    key = (settings.credentials_url, settings.credentials_role)
    with _ROLES_LOCK:
        if key not in _ROLES:
            _ROLES[key] = RoleCredentials(settings.credentials_role, settings.credentials_url)
        return _ROLES[key]
