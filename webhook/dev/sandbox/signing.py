"""Check the ``Authorization`` header of a COS/CI request, as Tencent's front ends do.

The algorithm is the one in Tencent's "Request Signature" document (COS XML API):

1. ``SignKey = HMAC-SHA1(SecretKey, KeyTime)`` in lowercase hex;
2. ``HttpString = method + "\\n" + path + "\\n" + params + "\\n" + headers + "\\n"``, where ``params`` and
   ``headers`` are the parameters and headers named in ``q-url-param-list`` / ``q-header-list``,
   written ``name=value`` with both URL-encoded (name lowercased), sorted and joined by ``&``;
3. ``StringToSign = "sha1\\n" + KeyTime + "\\n" + SHA1(HttpString) + "\\n"``;
4. ``Signature = HMAC-SHA1(SignKey, StringToSign)`` in lowercase hex.

The same fields come either in the ``Authorization`` header or, in a presigned URL, as query
parameters (``?q-sign-algorithm=sha1&q-ak=…&q-signature=…``); those are not themselves signed.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterable, Mapping
from urllib.parse import quote

FIELDS = ("q-sign-algorithm", "q-ak", "q-sign-time", "q-key-time", "q-header-list", "q-url-param-list", "q-signature")


class SignatureError(Exception):
    """A request that fails authentication; ``code`` is the COS error code to answer with 403."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def verify_request(
    authorization: str,
    *,
    method: str,
    path: str,
    params: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    signing_key: Callable[[str], str],
    now: float | None = None,
) -> str:
    """Return the SecretId the request is signed with; raise :class:`SignatureError` unless it is
    signed with the key ``signing_key`` gives for that id (which raises it for an unknown one).

    The signature is ``authorization`` or, when that is empty, the signature fields among ``params``
    (a presigned URL). ``path`` is the URL-decoded path (what the SDK signs); ``headers`` has
    lowercase names.
    """
    params = list(params)
    fields = _parse(authorization) if authorization else _from_query(params)
    if fields["q-sign-algorithm"] != "sha1":
        raise SignatureError("AccessDenied", f"q-sign-algorithm {fields['q-sign-algorithm']!r} is not supported")
    secret_key = signing_key(fields["q-ak"])
    now = time.time() if now is None else now
    # Only the key time is signed: checking it too keeps an edited q-sign-time from extending a URL's life.
    for name in ("q-sign-time", "q-key-time"):
        _check_time(name, fields[name], now)
    key_time = fields["q-key-time"]
    http_string = "\n".join(
        (
            method.lower(),
            path,
            _canonical(fields["q-url-param-list"], _encoded_params(params), "URL parameter"),
            _canonical(fields["q-header-list"], _encoded_headers(fields["q-header-list"], headers), "header"),
            "",
        )
    )
    digest = hashlib.sha1(http_string.encode()).hexdigest()  # noqa: S324 - SHA-1 is what the COS protocol specifies
    string_to_sign = f"sha1\n{key_time}\n{digest}\n"
    sign_key = _hmac_hex(secret_key, key_time)
    expected = _hmac_hex(sign_key, string_to_sign)
    if not hmac.compare_digest(expected, fields["q-signature"]):
        raise SignatureError("SignatureDoesNotMatch", "the request signature does not match the one calculated")
    return fields["q-ak"]


def _parse(authorization: str) -> dict[str, str]:
    fields = dict(part.partition("=")[::2] for part in authorization.split("&"))
    missing = [name for name in FIELDS if name not in fields]
    if missing:
        raise SignatureError("AccessDenied", f"the Authorization header lacks {', '.join(missing)}")
    return fields


def _from_query(params: list[tuple[str, str]]) -> dict[str, str]:
    fields = {name: value for name, value in params if name in FIELDS}
    if not fields:
        raise SignatureError("AccessDenied", "the request has no Authorization header and no signature parameters")
    missing = [name for name in FIELDS if name not in fields]
    if missing:
        raise SignatureError("AccessDenied", f"the URL's signature lacks {', '.join(missing)}")
    return fields


def _check_time(name: str, sign_time: str, now: float) -> None:
    start, _, end = sign_time.partition(";")
    if not (start.isdigit() and end.isdigit()):
        raise SignatureError("AccessDenied", f"{name} {sign_time!r} is not <start>;<end>")
    if now > int(end):
        raise SignatureError("AccessDenied", "Request has expired")
    if now < int(start):
        raise SignatureError("AccessDenied", "the request signature is not valid yet")


def _encode(text: str) -> str:
    # The SDK and the document both keep only - _ . ~ unescaped (so "/" and " " are escaped).
    return quote(text, safe="-_.~")


def _encoded_params(params: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {_encode(name).lower(): _encode(value) for name, value in params}


def _encoded_headers(header_list: str, headers: Mapping[str, str]) -> dict[str, str]:
    encoded = {}
    for name in filter(None, header_list.split(";")):
        value = headers.get(name)
        if value is not None:
            # WSGI hands header values over as latin-1 text; undo that to sign the bytes that were sent.
            encoded[name] = quote(value.encode("latin-1"), safe="-_.~")
    return encoded


def _canonical(name_list: str, encoded: dict[str, str], kind: str) -> str:
    names = [name for name in name_list.split(";") if name]
    absent = [name for name in names if name not in encoded]
    if absent:
        raise SignatureError("SignatureDoesNotMatch", f"signed {kind} {', '.join(absent)} is not in the request")
    return "&".join(f"{name}={encoded[name]}" for name in sorted(names))


def _hmac_hex(key: str, message: str) -> str:
    return hmac.new(key.encode(), message.encode(), hashlib.sha1).hexdigest()
