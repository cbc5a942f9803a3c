"""A sink that stores ``<prefix><job_id><ext>`` (numbered for several files) and ``<prefix><job_id>.event.json``
in a COS bucket."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qcloud_cos.cos_exception import CosClientError, CosServiceError

from webhook.ci.client import COS, CloudError, cloud_error, source_client
from webhook.ci.crc64 import crc64ecma
from webhook.ci.credentials import Credentials, CredentialSource, StaticCredentials
from webhook.ci.fetch import presigned_url
from webhook.config_values import CosEndpoint, parse_endpoint
from webhook.deadline import DEFAULT_MIN_RATE, DEFAULT_TIMEOUT, Deadline, current, transfer_budget
from webhook.errors import ConfigError
from webhook.models import Event, FetchedFile, FileLocation, Job, JobFile, ObjectLocation
from webhook.sinks import BuildContext, DeliveryError
from webhook.sinks.common import (
    BucketSink,
    audio_name,
    audio_names,
    os_reason,
    printable,
    safe_content_type,
    unreadable,
    user_metadata,
)
from webhook.sinks.options import CosOptions

# Worth another attempt besides 408, 429 and 5xx: COS answers these with 400 or 409 when a body
# arrived late, short or damaged, or a concurrent write to the same key got in the way.
_RETRYABLE_CODES = frozenset({"RequestTimeOut", "RequestTimeout", "IncompleteBody", "BadDigest", "OperationAborted"})


class CosSink(BucketSink):
    """Stores each event's audio files, then its metadata document, in ``cos://<bucket>/<prefix>``.

    Keys are ``<prefix><job_id><ext>`` (the output key's suffix, ``.bin`` if odd), or
    ``<prefix><job_id>.<n><ext>`` for each of a job's several files, and
    ``<prefix><job_id>.event.json``; the JSON is written last, so its presence means the audio
    is complete. A failed job gets only the JSON. Delivering again overwrites the same keys. Both
    objects carry ``x-cos-meta-job-id``, ``-event-id`` and ``-user-data`` (percent-encoded).

    With ``server_side_copy`` (the default) and the job's output in the bucket's region, COS
    copies the object itself and no byte passes through the worker; the sink's credentials must
    then be allowed to read the output bucket. Otherwise the downloaded file is uploaded with one
    PUT (COS takes up to 5 GB that way). Either way the stored object's CRC64 must equal the one
    COS reported for the output, or the delivery is retried.

    A delivery has a deadline of ``timeout`` seconds plus the file's time at ``min_rate`` bytes/s
    (a copy too: COS takes longer to copy more); past it, it is abandoned and retried.
    """

    scheme = "cos"
    options: CosOptions

    def __init__(
        self,
        name: str,
        options: CosOptions,
        *,
        secret_id: str,
        secret_key: str,
        default_endpoint: CosEndpoint | None,
        timeout: float = DEFAULT_TIMEOUT,
        min_rate: int = DEFAULT_MIN_RATE,
        credentials: CredentialSource | None = None,
    ) -> None:
        """With ``credentials`` (the service's own), those sign its requests instead of the two keys."""
        self.name = name
        self.options = options
        self.timeout = timeout
        self.min_rate = min_rate
        self._secret_key = secret_key  # only to scrub it from messages COS echoes back
        try:
            endpoint = parse_endpoint(options.endpoint) if options.endpoint else default_endpoint
        except ValueError as exc:
            raise ConfigError(f"sink {name}: options.endpoint {exc}") from None
        try:
            source = credentials or StaticCredentials(Credentials(secret_id, secret_key))
            self._client = source_client(source, options.region, endpoint, timeout)
            self._signer = source_client(source, options.region)  # presigns: see webhook.ci.client.signer
        except CosClientError as exc:
            raise ConfigError(f"sink {name}: {exc}") from None

    @classmethod
    def from_options(cls, name: str, options: CosOptions, context: BuildContext) -> CosSink:
        # The service's own variables: its keys as it uses them (with COS_SECRET_TOKEN, or its CAM role's).
        own = (options.secret_id_env, options.secret_key_env) == ("COS_SECRET_ID", "COS_SECRET_KEY")
        credentials = context.cos_credentials if own else None
        return cls(
            name,
            options,
            secret_id="" if credentials else context.secret(name, options.secret_id_env) or "",
            secret_key="" if credentials else context.secret(name, options.secret_key_env) or "",
            default_endpoint=context.cos_endpoint,
            timeout=context.cos_timeout,
            min_rate=context.min_transfer_rate,
            credentials=credentials,
        )

    def needs_bytes(self, job: Job) -> bool:
        """False when COS can copy the output into the bucket itself (same region, copy enabled)."""
        return not self._copies(job)

    def deliver(self, event: Event) -> None:
        """Copy or upload each audio file and check its CRC64, then write the JSON and check it too."""
        size = sum(file.fetched.size for file in event.files)
        with Deadline(transfer_budget(self.timeout, size, self.min_rate), f"delivery to sink {self.name}"):
            self._deliver(event)

    def _deliver(self, event: Event) -> None:
        metadata = {f"x-cos-meta-{k}": v for k, v in user_metadata(event).items()}
        copying = self._copies(event.job)
        # Every file, then the document: a failure part way leaves the earlier objects without a
        # document listing them, until the retry overwrites them all and writes it.
        for file, key in zip(event.files, audio_names(self.options.prefix, event), strict=True):
            if copying:
                source = file.source
                response = self._call(
                    "copy_object",
                    key,
                    self._client.copy_object,
                    Bucket=self.options.bucket,
                    Key=key,
                    CopySource={"Bucket": source.bucket, "Key": source.key, "Region": source.region},
                    # Replaced, not Copy: the copy gets this event's metadata instead of the source's.
                    CopyStatus="Replaced",
                    ContentType=safe_content_type(file.fetched.content_type),
                    Metadata=metadata,
                )
            else:
                response = self._upload(key, file.fetched, metadata)
            self._check_crc(key, response, file.fetched.crc64)
        key, document, response = self._put_document(event, metadata)
        self._check_crc(key, response, str(crc64ecma(document)))

    def location(
        self, job: Job, presign_seconds: int | None = None, file: JobFile | None = None
    ) -> FileLocation | None:
        """The audio's bucket and key, with a presigned GET URL when ``presign_seconds`` is given.

        The URL names the bucket's public host (``https://<bucket>.cos.<region>.myqcloud.com``)
        even with an endpoint override: against the sandbox, send it there with
        ``Sandbox.request_target``.
        """
        if not job.succeeded:
            return None
        key = audio_name(self.options.prefix, job, file)
        where = ObjectLocation(self.options.bucket, self.options.region, key)
        url = presigned_url(self._signer, where, presign_seconds) if presign_seconds else ""
        return FileLocation(kind="cos", bucket=where.bucket, key=key, region=where.region, url=url)

    def check(self) -> str:
        """HEAD the bucket: proves the endpoint answers, the bucket exists and the credentials may use it."""
        with Deadline(self.timeout, f"HEAD of sink {self.name}"):
            self._call("head_bucket", "", self._client.head_bucket, Bucket=self.options.bucket)
        return "reachable"

    def _copies(self, job: Job) -> bool:
        """Whether COS copies the job's files itself, each from where CI wrote it: its output is in this region."""
        output = job.output
        return self.options.server_side_copy and output is not None and output.region == self.options.region

    def _upload(self, key: str, file: FetchedFile, metadata: dict[str, str]) -> dict[str, Any]:
        if file.path is None:
            raise DeliveryError(f"{self.name}: {self._url(key)}: the output was not downloaded", permanent=True)
        try:
            with open(file.path, "rb") as body:  # streamed by the SDK, never read whole
                response: dict[str, Any] = self._put(key, body, safe_content_type(file.content_type), metadata)
        except OSError as exc:
            raise unreadable(self.name, exc) from exc
        return response

    def _check_crc(self, key: str, response: dict[str, Any], expected: str) -> None:
        """Compare the CRC64 COS computed for what it stored with ``expected`` (skipped if either is unknown)."""
        # PUT answers with a header, a copy with <CRC64> in its body (merged into the dict by the SDK).
        found = {name.lower(): value for name, value in response.items()}
        actual = found.get("x-cos-hash-crc64ecma") or found.get("crc64")
        if actual is None:
            head = self._head(key)
            actual = {name.lower(): value for name, value in head.items()}.get("x-cos-hash-crc64ecma")
        if expected and actual and actual != expected:
            # Left in place: the JSON is not written, and the next attempt overwrites the object.
            raise DeliveryError(f"{self.name}: {self._url(key)} has CRC64 {actual}, expected {expected}")

    def _call(self, operation: str, key: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        where = f"{self.name}: {operation} {self._url(key)}"
        try:
            response: dict[str, Any] = method(*args, **kwargs)
        except CosServiceError as exc:
            raise self._refused(where, cloud_error(exc, COS)) from exc
        except CosClientError as exc:
            deadline = current()
            if deadline is not None and deadline.expired:
                raise DeliveryError(f"{where}: {deadline.passed_message()}") from exc
            # Not str(exc): the SDK packs the whole request URL and retry log into it.
            raise DeliveryError(f"{where}: COS unreachable: {os_reason(exc)}") from exc
        return response

    def _refused(self, where: str, answer: CloudError) -> DeliveryError:
        status = answer.status or 0
        # A HEAD has no body, so COS's answer to one has no code to report.
        reason = f"HTTP {status}" + (f" {answer.code}" if answer.code else "")
        if message := printable(answer.message):
            reason += f": {message}"
        if self._secret_key:
            reason = reason.replace(self._secret_key, "[redacted]")
        # Below 400: a copy that failed after COS had already answered 200 (the error is in the body).
        retryable = answer.code in _RETRYABLE_CODES or status in (408, 429) or status >= 500 or status < 400
        return DeliveryError(f"{where}: {reason}", permanent=not retryable)
