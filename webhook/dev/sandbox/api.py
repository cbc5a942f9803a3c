"""The sandbox's WSGI application: it routes a request by its ``Host`` and path to a bucket and
key, checks its signature, applies the fault that picks it, and serves COS object calls (GET, PUT,
copy, HEAD, DELETE, HEAD Bucket) from :mod:`webhook.dev.sandbox.store` and CI job calls from
:mod:`webhook.dev.sandbox.jobs` (the job list from :mod:`webhook.dev.sandbox.listing`, the Speeching queue
from :mod:`webhook.dev.sandbox.queues`). Requests for :data:`FAULTS_PATH` go to :mod:`webhook.dev.sandbox.admin`;
TDMQ's ``/v2/index.php`` on a host that names no bucket, and its faults, to :mod:`webhook.dev.sandbox.cmq`.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from werkzeug.exceptions import ClientDisconnected
from werkzeug.wrappers import Request, Response

from webhook.dev.sandbox.admin import FAULTS_PATH, faults_endpoint
from webhook.dev.sandbox.cmq import FAULTS_PATH as CMQ_FAULTS_PATH
from webhook.dev.sandbox.cmq import PATH as CMQ_PATH
from webhook.dev.sandbox.cmq import CmqService
from webhook.dev.sandbox.faults import Fault, Faults
from webhook.dev.sandbox.jobs import MediaJobs
from webhook.dev.sandbox.keys import ROLE_PATH, Keyring
from webhook.dev.sandbox.listing import PARAMETERS, JobQuery, list_jobs
from webhook.dev.sandbox.queues import QUEUE_PATH, SpeechQueues, is_queue_update
from webhook.dev.sandbox.responses import ApiError, apply_fault, error_response, file_body, object_headers, xml_response
from webhook.dev.sandbox.signing import FIELDS, SignatureError, verify_request
from webhook.dev.sandbox.store import BUCKET_NAME, NoSuchKey, ObjectInfo, ObjectStore, read_chunks
from webhook.dev.sandbox.submission import JobRequestError, new_job

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger(__name__)

_HOST = re.compile(r"(?P<bucket>[^.]+)\.(?P<service>cos|ci)\.(?P<region>[^.]+)\.myqcloud\.com(?::\d+)?")
# What cos-python-sdk-v5's copy_object sends: the source's host, then its URL-encoded key.
_COPY_SOURCE = re.compile(r"(?P<bucket>[^./]+)\.cos\.(?P<region>[^./]+)\.myqcloud\.com/(?P<key>.+)")
_META_PREFIX = "x-cos-meta-"
_TOKEN_PARAMETER = "x-cos-security-token"  # noqa: S105 - the name a presigned URL carries a token under
_MAX_JOB_REQUEST = 64 * 1024


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
        keys: Keyring,
        appid: str,
        faults: Faults | None = None,
        tdmq: CmqService | None = None,
    ) -> None:
        self._store = store
        self._jobs = jobs
        self._faults = faults or Faults()
        self._keys = keys
        self._appid = appid
        self._queues = SpeechQueues(appid)
        self._tdmq = tdmq or CmqService(keys.secret_id, keys.secret_key)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        if _path(request) == FAULTS_PATH:
            return faults_endpoint(self._faults, request)(environ, start_response)
        if _path(request).startswith(ROLE_PATH) and _HOST.fullmatch(request.host.lower()) is None:
            return self._keys.metadata(request)(environ, start_response)
        if _path(request) == CMQ_FAULTS_PATH or (
            _path(request) == CMQ_PATH and _HOST.fullmatch(request.host.lower()) is None
        ):
            return self._tdmq.app(environ, start_response)
        request_id = uuid.uuid4().hex
        fault: Fault | None = None
        try:
            target = self._target(request)
            secret_id = self._authenticate(request, target)
            self._authorize(request, target, secret_id)
            fault = self._faults.pick(_kind(request.method, target), request.method, _path(request))
            if fault is not None:
                self._faults.sleep(fault.delay)
                if fault.status is not None:
                    raise ApiError(fault.status, fault.error_code(), "injected by a sandbox fault")
            response = self._ci(request, target) if target.ci else self._object(request, target)
            if target.ci:
                response.headers["x-ci-request-id"] = request_id
        except ApiError as exc:
            response = error_response(exc, f"{request.host}{_path(request)}", request_id)
        except Exception as exc:  # answered as COS would, so the SDK reports it instead of a parse error
            log.exception("sandbox request %s %s failed", request.method, request.path)
            response = error_response(
                ApiError(500, "InternalError", str(exc)), f"{request.host}{_path(request)}", request_id
            )
        response.headers["x-cos-request-id"] = request_id
        if fault is None:
            return response(environ, start_response)
        return apply_fault(fault, response, environ, start_response)

    def _authenticate(self, request: Request, target: _Target) -> str:
        """The SecretId that signed the request, with its token if it is a temporary one."""
        # The SDK sends the token of temporary keys in x-ci-security-token on CI calls, whichever
        # host they go to; a presigned URL carries it as a parameter.
        header = "x-ci-security-token" if target.ci else "x-cos-security-token"
        token = request.headers.get(header) or request.args.get(_TOKEN_PARAMETER, "")
        try:
            return verify_request(
                request.headers.get("Authorization", ""),
                method=request.method,
                path=_path(request),
                params=request.args.items(multi=True),
                headers={name.lower(): value for name, value in request.headers.items()},
                signing_key=lambda secret_id: self._keys.signing_key(secret_id, token),
            )
        except SignatureError as exc:
            raise ApiError(403, exc.code, exc.message) from None

    def _authorize(self, request: Request, target: _Target, secret_id: str) -> None:
        """403 AccessDenied for an action the keyring denies (a copy reads its source too)."""
        self._keys.authorize(_action(request.method, target), secret_id)
        if not target.ci and request.method == "PUT" and "x-cos-copy-source" in request.headers:
            self._keys.authorize("cos:GetObject", secret_id)

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
        # An object that happens to be named jobs, jobs/<id> or asrqueue still wins over those CI calls.
        if method == "POST":
            return key == "jobs"
        if method == "PUT":
            return is_queue_update(key)
        if method != "GET" or not (
            key in ("jobs", QUEUE_PATH) or (key.startswith("jobs/") and "/" not in key[len("jobs/") :])
        ):
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
        names = sorted(name for name in request.args if name not in FIELDS and name != _TOKEN_PARAMETER)
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
            return Response(status=200, headers=object_headers(self._head(target)))
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
        return xml_response(result, root="CopyObjectResult")

    def _get(self, request: Request, target: _Target) -> Response:
        try:
            info, file = self._store.open(target.bucket, target.key)
        except NoSuchKey:
            raise _no_such_key(target) from None
        headers = object_headers(info)
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
        return Response(file_body(file, length), status=status, headers=headers, direct_passthrough=True)

    def _head(self, target: _Target) -> ObjectInfo:
        try:
            return self._store.head(target.bucket, target.key)
        except NoSuchKey:
            raise _no_such_key(target) from None

    def _ci(self, request: Request, target: _Target) -> Response:
        try:
            return self._ci_call(request, target)
        except JobRequestError as exc:
            raise ApiError(400, exc.code, exc.message) from None

    def _ci_call(self, request: Request, target: _Target) -> Response:
        if request.method == "POST" and target.key == "jobs":
            body = request.stream.read(_MAX_JOB_REQUEST + 1)
            if len(body) > _MAX_JOB_REQUEST:
                raise ApiError(400, "InvalidArgument", f"the request body is larger than {_MAX_JOB_REQUEST} bytes")
            job = new_job(
                body,
                bucket=target.bucket,
                region=target.region,
                queue_id=self._queues.queue_id(target.bucket),
                queue_notify=self._queues.notification(target.bucket),
            )
            self._check_bucket(job.output_bucket)
            return xml_response({"JobsDetail": self._jobs.submit(job)})
        if request.method == "GET" and target.key == "jobs":
            names = sorted(name for name in request.args if name not in (*PARAMETERS, *FIELDS, _TOKEN_PARAMETER))
            if names:
                raise ApiError(501, "NotImplemented", f"the sandbox's job list has no parameter {', '.join(names)}")
            return xml_response(list_jobs(self._jobs.details(target.bucket), JobQuery.parse(request.args)))
        if request.method == "GET" and target.key.startswith("jobs/"):
            job_ids = [job_id for job_id in target.key[len("jobs/") :].split(",") if job_id]
            details, missing = self._jobs.describe(target.bucket, target.region, job_ids)
            # As in CI, each element appears only when it has something in it.
            found: dict[str, Any] = {"JobsDetail": details} if details else {}
            return xml_response(found | ({"NonExistJobIds": missing} if missing else {}))
        if target.key.split("/", 1)[0] == QUEUE_PATH:
            return xml_response(
                self._queues.call(request.method, target.bucket, target.key, request.args, request.stream)
            )
        raise ApiError(
            501,
            "NotImplemented",
            "the sandbox's CI API has POST /jobs, GET /jobs, GET /jobs/<JobId>, "
            "GET /asrqueue and PUT /asrqueue/<QueueId>",
        )


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


def _kind(method: str, target: _Target) -> str:
    """The request as fault rules name it (see ``faults.KINDS``)."""
    if target.ci:
        if target.key.split("/", 1)[0] == QUEUE_PATH:
            return "CI queue"  # not in faults.KINDS yet: match these by path (/asrqueue*)
        if method == "GET" and target.key == "jobs":
            return "CI list"
        return {"POST": "CI submit", "GET": "CI describe"}.get(method, f"CI {method}")
    return f"object {method}" if target.key else f"bucket {method}"


def _action(method: str, target: _Target) -> str:
    """The CAM action a request is (as a policy names it), for :meth:`Keyring.authorize`."""
    if target.ci:
        if target.key.split("/", 1)[0] == QUEUE_PATH:
            return "ci:UpdateAsrQueue" if method == "PUT" else "ci:DescribeAsrQueues"
        if method == "POST":
            return "ci:CreateMediaJobs"
        return "ci:DescribeMediaJobs" if target.key == "jobs" else "ci:DescribeMediaJob"
    if not target.key:
        return f"cos:{method.capitalize()}Bucket"
    return f"cos:{method.capitalize()}Object"


def _no_such_key(target: _Target) -> ApiError:
    return ApiError(404, "NoSuchKey", f"the object {target.key!r} does not exist in {target.bucket}")
