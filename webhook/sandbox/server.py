"""The sandbox's HTTP front end: COS object calls and CI job calls, as the real SDK sends them.

Point ``webhook.cos.make_client`` at :attr:`Sandbox.endpoint`: the SDK then connects here and
names the bucket in ``Host`` (``<bucket>.cos.<region>.myqcloud.com``), which is how requests
are routed. The CI API is also served on ``<bucket>.ci.<region>.myqcloud.com``.

Served: PUT (also a server-side copy with ``x-cos-copy-source``), GET (with ``Range``), HEAD and
DELETE Object, with ``Content-Type`` and ``x-cos-meta-*`` kept; HEAD Bucket (every bucket named
``<name>-<appid>`` exists); the CI calls in :mod:`webhook.sandbox.jobs`. Requests are signed in the
``Authorization`` header or, for presigned URLs, in the query string.

A presigned URL names the bucket's host, and its signature covers that host. With
``CosConfig(IP=...)`` the SDK would put the IP in the URL instead and lose the bucket, so sign
with a client that has no IP (``make_client(id, key, region)``) and send the URL here with its
host kept in ``Host``: :meth:`Sandbox.request_target` does the rewriting.

Faults (:mod:`webhook.sandbox.faults`) make chosen requests fail: :attr:`Sandbox.faults` in a
test, or ``/_sandbox/faults`` on any host for a running sandbox (so an object of that name is
out of reach). Examples, to develop against a flaky COS::

    sandbox.faults.add(Fault(kind="object GET", status=503, retry_after=5, times=2))
    sandbox.faults.add(Fault(kind="object GET", path="/out/*", reset=4096, rate=0.3, seed=1))
    sandbox.faults.clear()

    curl -X POST http://127.0.0.1:9000/_sandbox/faults -d '{"kind": "CI describe", "delay": 3}'
    curl http://127.0.0.1:9000/_sandbox/faults            # what is active, and how often it fired
    curl -X DELETE http://127.0.0.1:9000/_sandbox/faults  # clear

A fault is checked after the request is routed and its signature accepted. ``status`` answers
with COS's ``<Error>`` body instead of serving the request (a CI submit creates no job).
``reset`` and ``truncate`` send the headers with the full ``Content-Length``, then part of the
body, then end the connection with a TCP reset or a clean close.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import socket
import struct
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

import xmltodict
from qcloud_cos import CosS3Client
from werkzeug.exceptions import ClientDisconnected
from werkzeug.http import http_date
from werkzeug.serving import BaseWSGIServer, ThreadedWSGIServer
from werkzeug.wrappers import Request, Response

from webhook.config import CosEndpoint
from webhook.cos import make_client
from webhook.sandbox.faults import Fault, Faults
from webhook.sandbox.jobs import JobRequestError, MediaJobs, SentCallback, new_job
from webhook.sandbox.signing import FIELDS, SignatureError, verify_request
from webhook.sandbox.store import BUCKET_NAME, NoSuchKey, ObjectInfo, ObjectStore, read_chunks

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger(__name__)

# Fixed, public credentials: the sandbox guards nothing, but it checks signatures like COS.
SANDBOX_ID = "sandbox-secret-id"
SANDBOX_KEY = "sandbox-secret-key"
SANDBOX_APPID = "1250000000"
DEFAULT_REGION = "ap-guangzhou"
_HOST = re.compile(r"(?P<bucket>[^.]+)\.(?P<service>cos|ci)\.(?P<region>[^.]+)\.myqcloud\.com(?::\d+)?")
# What cos-python-sdk-v5's copy_object sends: the source's host, then its URL-encoded key.
_COPY_SOURCE = re.compile(r"(?P<bucket>[^./]+)\.cos\.(?P<region>[^./]+)\.myqcloud\.com/(?P<key>.+)")
_META_PREFIX = "x-cos-meta-"
_MAX_JOB_REQUEST = 64 * 1024
FAULTS_PATH = "/_sandbox/faults"
_LINGER_ABORT = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}


class ApiError(Exception):
    """An error answered as COS does: ``status`` and an ``<Error>`` XML body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class _Target:
    bucket: str
    region: str
    key: str  # the URL-decoded path without its leading "/"
    ci: bool  # a CI call rather than a COS object call


class SandboxApp:
    """The WSGI application: route by Host and path, check the signature, then serve COS or CI."""

    def __init__(
        self,
        store: ObjectStore,
        jobs: MediaJobs,
        *,
        secret_id: str,
        secret_key: str,
        appid: str,
        faults: Faults | None = None,
    ) -> None:
        self._store = store
        self._jobs = jobs
        self._faults = faults or Faults()
        self._secret_id = secret_id
        self._secret_key = secret_key
        self._appid = appid
        self._queue_id = "p" + hashlib.sha256(appid.encode()).hexdigest()[:32]

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        if _path(request) == FAULTS_PATH:
            return self._admin(request)(environ, start_response)
        request_id = uuid.uuid4().hex
        fault: Fault | None = None
        try:
            target = self._target(request)
            self._authenticate(request)
            fault = self._faults.pick(_kind(request.method, target), request.method, _path(request))
            if fault is not None:
                self._faults.sleep(fault.delay)
                if fault.status is not None:
                    raise ApiError(fault.status, fault.error_code(), "injected by a sandbox fault")
            response = self._ci(request, target) if target.ci else self._object(request, target)
            if target.ci:
                response.headers["x-ci-request-id"] = request_id
        except ApiError as exc:
            response = _error_response(exc, request, request_id)
        except Exception as exc:  # answered as COS would, so the SDK reports it instead of a parse error
            log.exception("sandbox request %s %s failed", request.method, request.path)
            response = _error_response(ApiError(500, "InternalError", str(exc)), request, request_id)
        response.headers["x-cos-request-id"] = request_id
        if fault is None:
            return response(environ, start_response)
        return _faulty(fault, response, environ, start_response)

    def _authenticate(self, request: Request) -> None:
        try:
            verify_request(
                request.headers.get("Authorization", ""),
                method=request.method,
                path=_path(request),
                params=request.args.items(multi=True),
                headers={name.lower(): value for name, value in request.headers.items()},
                secret_id=self._secret_id,
                secret_key=self._secret_key,
            )
        except SignatureError as exc:
            raise ApiError(403, exc.code, exc.message) from None

    def _admin(self, request: Request) -> Response:
        """``/_sandbox/faults``: GET lists the faults, POST adds one (or a JSON list), DELETE clears."""
        if request.method == "POST":
            try:
                data = json.loads(request.stream.read(_MAX_JOB_REQUEST))
                faults = [Fault.from_dict(item) for item in (data if isinstance(data, list) else [data])]
            except ValueError as exc:  # FaultError and JSONDecodeError both are
                return _json_response({"error": str(exc)}, 400)
            for fault in faults:
                self._faults.add(fault)
        elif request.method == "DELETE":
            self._faults.clear()
        elif request.method != "GET":
            response = _json_response({"error": f"{request.method} is not allowed here"}, 405)
            response.headers["Allow"] = "GET, POST, DELETE"
            return response
        return _json_response({"faults": [active.to_dict() for active in self._faults.active]})

    def _target(self, request: Request) -> _Target:
        match = _HOST.fullmatch(request.host.lower())
        if match is None:
            raise ApiError(
                400,
                "InvalidURI",
                f"Host {request.host!r} is not <bucket>.cos.<region>.myqcloud.com or <bucket>.ci.<region>.myqcloud.com",
            )
        bucket, key = match["bucket"], _path(request)[1:]
        self._check_bucket(bucket)
        ci = match["service"] == "ci" or self._is_ci_call(request.method, bucket, key)
        return _Target(bucket, match["region"], key, ci)

    def _check_bucket(self, bucket: str) -> None:
        if not (BUCKET_NAME.fullmatch(bucket) and bucket.endswith(f"-{self._appid}")):
            raise ApiError(
                404, "NoSuchBucket", f"bucket {bucket!r} does not exist: sandbox buckets are <name>-{self._appid}"
            )

    def _is_ci_call(self, method: str, bucket: str, key: str) -> bool:
        # With CosConfig(IP=...) the SDK sends CI calls with the bucket's *COS* host too (its
        # get_host knows only the COS endpoint), so CI paths must be recognised there as well.
        # An object that happens to be named jobs/<id> still wins over the job lookup.
        if method == "POST":
            return key == "jobs"
        if method != "GET" or not key.startswith("jobs/") or "/" in key[len("jobs/") :]:
            return False
        try:
            self._store.head(bucket, key)
        except NoSuchKey:
            return True
        return False

    def _object(self, request: Request, target: _Target) -> Response:
        if not target.key:
            if request.method == "HEAD":
                return Response(status=200, headers={"x-cos-bucket-region": target.region})
            raise ApiError(501, "NotImplemented", "the sandbox serves object calls and HEAD Bucket only")
        # A presigned URL's signature fields were checked already; any other parameter is refused
        # rather than ignored: ?uploadId&partNumber=1 ignored would overwrite the object.
        names = sorted(name for name in request.args if name not in FIELDS)
        if names:
            raise ApiError(501, "NotImplemented", f"the sandbox does not support the parameters {', '.join(names)}")
        if request.method == "PUT":
            copy_source = request.headers.get("x-cos-copy-source")
            if copy_source is not None:
                return self._copy(request, target, copy_source)
            return self._put(request, target)
        if request.method == "GET":
            return self._get(request, target)
        if request.method == "HEAD":
            return Response(status=200, headers=_object_headers(self._head(target)))
        if request.method == "DELETE":
            self._store.delete(target.bucket, target.key)
            return Response(status=204)
        raise ApiError(405, "MethodNotAllowed", f"{request.method} is not supported on objects")

    def _put(self, request: Request, target: _Target) -> Response:
        try:
            info = self._store.put(
                target.bucket, target.key, read_chunks(request.stream), _content_type(request), _metadata(request)
            )
        except ClientDisconnected:
            raise ApiError(400, "IncompleteBody", "the body ended before Content-Length bytes") from None
        return Response(status=200, headers={"ETag": f'"{info.md5}"', "x-cos-hash-crc64ecma": info.crc64})

    def _copy(self, request: Request, target: _Target, copy_source: str) -> Response:
        """PUT Object - Copy: the bytes never leave the store; answered with ``CopyObjectResult``."""
        match = _COPY_SOURCE.fullmatch(copy_source)
        if match is None:
            raise ApiError(
                400,
                "InvalidArgument",
                f"x-cos-copy-source {copy_source!r} is not <bucket>.cos.<region>.myqcloud.com/<key>",
            )
        if "?" in match["key"]:
            raise ApiError(501, "NotImplemented", "the sandbox keeps no object versions (?versionId=)")
        bucket, key = match["bucket"], unquote(match["key"])
        self._check_bucket(bucket)
        directive = request.headers.get("x-cos-metadata-directive", "Copy")
        if directive not in ("Copy", "Replaced"):
            raise ApiError(
                400, "InvalidArgument", f"x-cos-metadata-directive must be Copy or Replaced, not {directive!r}"
            )
        if directive == "Copy" and (bucket, key) == (target.bucket, target.key):
            raise ApiError(400, "InvalidRequest", "copying an object onto itself must replace its metadata")
        replaced = directive == "Replaced"
        try:
            info = self._store.copy(
                bucket,
                key,
                target.bucket,
                target.key,
                _content_type(request) if replaced else None,
                _metadata(request) if replaced else None,
            )
        except NoSuchKey:
            raise ApiError(404, "NoSuchKey", f"the copy source {key!r} does not exist in {bucket}") from None
        modified = datetime.fromtimestamp(info.last_modified, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        result = {"ETag": f'"{info.md5}"', "CRC64": info.crc64, "LastModified": modified}
        return _xml_response(result, root="CopyObjectResult")

    def _get(self, request: Request, target: _Target) -> Response:
        try:
            info, file = self._store.open(target.bucket, target.key)
        except NoSuchKey:
            raise _no_such_key(target) from None
        headers = _object_headers(info)
        start, length, status = 0, info.size, 200
        if request.range is not None:
            span = request.range.range_for_length(info.size)
            if span is None:
                file.close()
                raise ApiError(416, "InvalidRange", f"the range {request.headers['Range']!r} is not satisfiable")
            start, stop = span
            length, status = stop - start, 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{info.size}"
            headers["Content-Length"] = str(length)
        file.seek(start)
        return Response(_stream(file, length), status=status, headers=headers, direct_passthrough=True)

    def _head(self, target: _Target) -> ObjectInfo:
        try:
            return self._store.head(target.bucket, target.key)
        except NoSuchKey:
            raise _no_such_key(target) from None

    def _ci(self, request: Request, target: _Target) -> Response:
        if request.method == "POST" and target.key == "jobs":
            body = request.stream.read(_MAX_JOB_REQUEST + 1)
            if len(body) > _MAX_JOB_REQUEST:
                raise ApiError(400, "InvalidArgument", f"the request body is larger than {_MAX_JOB_REQUEST} bytes")
            try:
                job = new_job(body, bucket=target.bucket, region=target.region, queue_id=self._queue_id)
            except JobRequestError as exc:
                raise ApiError(400, exc.code, exc.message) from None
            self._check_bucket(job.output_bucket)
            return _xml_response({"JobsDetail": self._jobs.submit(job)})
        if request.method == "GET" and target.key.startswith("jobs/"):
            job_ids = [job_id for job_id in target.key[len("jobs/") :].split(",") if job_id]
            details, missing = self._jobs.describe(target.bucket, job_ids)
            # As in CI, each element appears only when it has something in it.
            found: dict[str, Any] = {"JobsDetail": details} if details else {}
            return _xml_response(found | ({"NonExistJobIds": missing} if missing else {}))
        raise ApiError(501, "NotImplemented", "the sandbox's CI API has POST /jobs and GET /jobs/<JobId> only")


class Sandbox:
    """A local COS + CI endpoint in a background thread, for tests, demos and development.

    ``with Sandbox().start() as sandbox:`` runs one on a free port with objects in a temporary
    directory; :meth:`client` returns an SDK client wired to it.
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        secret_id: str = SANDBOX_ID,
        secret_key: str = SANDBOX_KEY,
        appid: str = SANDBOX_APPID,
        job_delay: float = 0.0,
    ) -> None:
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        if root is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="cos-sandbox-")
            root = Path(self._tempdir.name)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.secret_id = secret_id
        self.secret_key = secret_key
        self.appid = appid
        self._store = ObjectStore(self.root)
        self._jobs = MediaJobs(self._store, job_delay=job_delay)
        self.faults = Faults()
        """The fault rules every request is checked against; see :mod:`webhook.sandbox.faults`."""
        self._app = SandboxApp(
            self._store, self._jobs, secret_id=secret_id, secret_key=secret_key, appid=appid, faults=self.faults
        )
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str = "127.0.0.1", port: int = 0) -> Sandbox:
        """Listen on ``host``:``port`` (0: any free port) and serve in a background thread."""
        self._server = _Server(host, port, self._app)
        # A short poll interval keeps stop() quick; tests start and stop many sandboxes.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="cos-sandbox", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, finish running jobs, and remove the temporary root if there is one."""
        self.faults.clear()  # ends delays in progress
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None
        self._jobs.close()
        if self._tempdir is not None:
            self._tempdir.cleanup()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._started().port

    @property
    def url(self) -> str:
        return f"http://{self._started().host}:{self.port}"

    @property
    def endpoint(self) -> CosEndpoint:
        """What ``webhook.cos.make_client`` (and ``WEBHOOK_COS_ENDPOINT``) needs to reach the sandbox."""
        return CosEndpoint("http", self._started().host, self.port)

    @property
    def callbacks_sent(self) -> list[SentCallback]:
        """Every callback delivered so far, oldest first."""
        return self._jobs.callbacks_sent

    def wait_for_callbacks(self, n: int, timeout: float) -> list[SentCallback]:
        """Block until ``n`` callbacks were sent and return them all; raise TimeoutError after ``timeout`` s."""
        return self._jobs.wait_for_callbacks(n, timeout)

    def object_path(self, bucket: str, key: str) -> Path:
        """Where the bytes of an object are stored."""
        return self._store.object_path(bucket, key)

    def client(self, region: str = DEFAULT_REGION) -> CosS3Client:
        """An SDK client with the sandbox's credentials, exactly as the product builds one."""
        return make_client(self.secret_id, self.secret_key, region, self.endpoint)

    def request_target(self, url: str) -> tuple[str, dict[str, str]]:
        """The sandbox URL and headers that send a request for the COS ``url`` here.

        ``url`` is ``https://<bucket>.cos.<region>.myqcloud.com/<key>?...``, for example a presigned
        URL: its host moves into ``Host``, which names the bucket and is covered by the signature::

            target, headers = sandbox.request_target(presigned)
            requests.get(target, headers=headers)
        """
        parts = urlsplit(url)
        return self.url + urlunsplit(("", "", parts.path, parts.query, "")), {"Host": parts.netloc}

    def _started(self) -> BaseWSGIServer:
        if self._server is None:
            raise RuntimeError("the sandbox is not running: call start() first")
        return self._server


def serve(
    host: str,
    port: int,
    root: Path | None = None,
    *,
    secret_id: str = SANDBOX_ID,
    secret_key: str = SANDBOX_KEY,
    appid: str = SANDBOX_APPID,
    job_delay: float = 0.0,
) -> None:
    """Run a sandbox in the foreground until Ctrl+C, after printing the settings that reach it."""
    sandbox = Sandbox(root, secret_id=secret_id, secret_key=secret_key, appid=appid, job_delay=job_delay)
    with sandbox.start(host, port), contextlib.suppress(KeyboardInterrupt):
        print(f"COS/CI sandbox listening on {sandbox.url}, objects under {sandbox.root}")
        print(f"Settings for cos-webhook (any region works, and any bucket named <name>-{appid}):")
        print(f"  COS_SECRET_ID={secret_id}")
        print(f"  COS_SECRET_KEY={secret_key}")
        print(f"  COS_REGION={DEFAULT_REGION}")
        print(f"  WEBHOOK_COS_ENDPOINT={sandbox.url}")
        print(f"  WEBHOOK_ALLOWED_BUCKETS=examplebucket-{appid}")
        print(f"Inject faults with POST {sandbox.url}{FAULTS_PATH} (see webhook/sandbox/faults.py).")
        print("Press Ctrl+C to stop.", flush=True)
        threading.Event().wait()


def _path(request: Request) -> str:
    # PATH_INFO, not request.path: werkzeug collapses leading slashes, and "/a" and "//a" are
    # different keys. WSGI carries it as latin-1 text holding the UTF-8 bytes.
    path: str = request.environ["PATH_INFO"]
    return path.encode("latin-1").decode("utf-8", "replace")


def _content_type(request: Request) -> str:
    return request.headers.get("Content-Type") or "application/octet-stream"


def _metadata(request: Request) -> dict[str, str]:
    """The request's ``x-cos-meta-*`` headers, stored with the object and returned on GET and HEAD."""
    return {name.lower(): value for name, value in request.headers.items() if name.lower().startswith(_META_PREFIX)}


def _object_headers(info: ObjectInfo) -> dict[str, str]:
    return {
        "Content-Type": info.content_type,
        "Content-Length": str(info.size),
        "ETag": f'"{info.md5}"',
        "Last-Modified": http_date(info.last_modified),
        "Accept-Ranges": "bytes",
        "x-cos-hash-crc64ecma": info.crc64,
        **info.metadata,
    }


def _kind(method: str, target: _Target) -> str:
    """The request as fault rules name it (see ``faults.KINDS``)."""
    if target.ci:
        return {"POST": "CI submit", "GET": "CI describe"}.get(method, f"CI {method}")
    return f"object {method}" if target.key else f"bucket {method}"


def _faulty(
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
        # Linger 0 makes the close send a TCP reset; _Server then closes without a FIN first.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
    # werkzeug takes a ConnectionError from the body for a client gone away: it writes nothing
    # more (no error page glued to the body) and closes the connection.
    raise ConnectionAbortedError("sandbox fault: the body is cut short")


class _Server(ThreadedWSGIServer):
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


def _stream(file: IO[bytes], length: int) -> Iterator[bytes]:
    with file:
        yield from read_chunks(file, length)


def _no_such_key(target: _Target) -> ApiError:
    return ApiError(404, "NoSuchKey", f"the object {target.key!r} does not exist in {target.bucket}")


def _json_response(body: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def _xml_response(body: dict[str, Any], root: str = "Response") -> Response:
    return Response(xmltodict.unparse({root: body}), content_type="application/xml")


def _error_response(exc: ApiError, request: Request, request_id: str) -> Response:
    error = {
        "Code": exc.code,
        "Message": exc.message,
        # The SDK only understands an error body that has all of these.
        "Resource": f"{request.host}{_path(request)}",
        "RequestId": request_id,
        "TraceId": request_id,
    }
    return Response(xmltodict.unparse({"Error": error}), status=exc.status, content_type="application/xml")
