"""How the sandbox answers: COS's ``<Error>`` body for an :class:`ApiError`, XML and JSON bodies,
object headers and bodies, and a response with a fault's damage applied (a wrong CRC64,
``Retry-After``, a body cut short by a clean close or a TCP reset), with :class:`ResettingServer`,
the werkzeug server that can send such a reset.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any

import xmltodict
from werkzeug.http import http_date
from werkzeug.serving import ThreadedWSGIServer
from werkzeug.wrappers import Response

from webhook.dev.sandbox.faults import Fault
from webhook.dev.sandbox.store import ObjectInfo, read_chunks

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

_LINGER_ABORT = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}


class ApiError(Exception):
    """An error answered as COS does: ``status`` and an ``<Error>`` XML body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def json_response(body: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def xml_response(body: dict[str, Any], root: str = "Response") -> Response:
    return Response(xmltodict.unparse({root: body}), content_type="application/xml")


def error_response(exc: ApiError, resource: str, request_id: str) -> Response:
    """COS's ``<Error>`` answer to a request for ``resource`` (its host and path)."""
    error = {
        "Code": exc.code,
        "Message": exc.message,
        # The SDK only understands an error body that has all of these.
        "Resource": resource,
        "RequestId": request_id,
        "TraceId": request_id,
    }
    return Response(xmltodict.unparse({"Error": error}), status=exc.status, content_type="application/xml")


def object_headers(info: ObjectInfo) -> dict[str, str]:
    """The headers COS answers GET and HEAD Object with."""
    return {
        "Content-Type": info.content_type,
        "Content-Length": str(info.size),
        "ETag": f'"{info.md5}"',
        "Last-Modified": http_date(info.last_modified),
        "Accept-Ranges": "bytes",
        "x-cos-hash-crc64ecma": info.crc64,
        **info.metadata,
    }


def file_body(file: IO[bytes], length: int) -> Iterator[bytes]:
    """``length`` bytes of ``file`` from where it is, in chunks; closes it at the end."""
    with file:
        yield from read_chunks(file, length)


def apply_fault(
    fault: Fault, response: Response, environ: WSGIEnvironment, start_response: StartResponse
) -> Iterable[bytes]:
    """Send ``response`` with the header and body faults of ``fault`` applied."""
    if fault.bad_crc and "x-cos-hash-crc64ecma" in response.headers:
        right = int(response.headers["x-cos-hash-crc64ecma"])
        response.headers["x-cos-hash-crc64ecma"] = str(right ^ 1)
    if fault.status is not None and fault.retry_after is not None:
        response.headers["Retry-After"] = str(fault.retry_after)
    body = response(environ, start_response)
    keep = fault.reset if fault.reset is not None else fault.truncate
    if keep is None:
        return body
    length = response.content_length or 0
    sock = environ.get("werkzeug.socket")
    return _cut(body, min(keep, max(length - 1, 0)), sock, reset=fault.reset is not None)


def _cut(body: Iterable[bytes], keep: int, sock: socket.socket | None, *, reset: bool) -> Iterator[bytes]:
    """The first ``keep`` bytes of ``body``, then the end of the connection."""
    try:
        yield b""  # has werkzeug send the status line and headers even when no body byte is kept
        for chunk in body:
            if keep <= 0:
                break
            yield chunk[:keep]
            keep -= len(chunk[:keep])
    finally:
        if hasattr(body, "close"):
            body.close()
    if reset and sock is not None:
        # Linger 0 makes the close send a TCP reset; ResettingServer then closes without a FIN first.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    # werkzeug takes a ConnectionError from the body for a client gone away: it writes nothing
    # more (no error page glued to the body) and closes the connection.
    raise ConnectionAbortedError("sandbox fault: the body is cut short")


class ResettingServer(ThreadedWSGIServer):
    """werkzeug's threaded server, except that a connection set to linger 0 is reset, not shut down."""

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        if (
            isinstance(request, socket.socket)
            and request.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, len(_LINGER_ABORT)) == _LINGER_ABORT
        ):
            # shutdown(SHUT_WR) would send a FIN, and the client would see a clean end of stream.
            self.close_request(request)
        else:
            super().shutdown_request(request)
