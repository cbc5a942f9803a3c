"""A sink that uploads ``<prefix><job_id><ext>`` (numbered for several files) and ``<prefix><job_id>.event.json``
to an S3-compatible bucket."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ChecksumError,
    ClientError,
    ConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    ReadTimeoutError,
)

from webhook.errors import ConfigError
from webhook.models import Event, FileLocation, Job, JobFile
from webhook.sinks import BuildContext, DeliveryError
from webhook.sinks.common import (
    BucketSink,
    audio_name,
    audio_names,
    os_reason,
    printable,
    retry_after_seconds,
    safe_content_type,
    unreadable,
    user_metadata,
)
from webhook.sinks.options import S3Options

_MiB = 1024 * 1024
_CONNECT_TIMEOUT = 10.0
# Seconds without a byte moving either way; a 5 MiB part is acknowledged only once it is all sent.
_READ_TIMEOUT = 60.0
# Connections kept open for reuse, not a limit: deliveries run in parallel (the worker's threads),
# each uploading up to max_concurrency parts at once, and botocore's default of 10 would have
# connections beyond it closed after each request and opened again, with a warning each time.
_POOL_CONNECTIONS = 64
# Answers worth another attempt besides 408, 429 and 5xx: throttling, timeouts, a body damaged or
# cut short in transit, expired temporary credentials (the default chain refreshes them), a
# multipart upload aborted under us (the next attempt starts a new one).
_RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestThrottled",
        "RequestLimitExceeded",
        "RequestTimeout",
        "ServiceUnavailable",
        "InternalError",
        "OperationAborted",
        "BadDigest",
        "IncompleteBody",
        "ExpiredToken",
        "NoSuchUpload",
    }
)
# Transport failures; any other BotoCoreError is a configuration problem (no credentials, bad
# parameters) that a retry cannot fix.
_RETRYABLE_LOCAL = (ConnectionError, HTTPClientError, ChecksumError, IncompleteReadError, CredentialRetrievalError)


class S3Sink(BucketSink):
    """Uploads each event's audio files, then its metadata document, to ``s3://<bucket>/<prefix><job_id>``.

    Keys are ``<prefix><job_id><ext>`` (the output key's suffix, ``.bin`` if odd), or
    ``<prefix><job_id>.<n><ext>`` for each of a job's several files, and
    ``<prefix><job_id>.event.json``; the JSON is written last, so its presence means the audio
    is complete. A failed job gets only the JSON. Delivering again overwrites the same keys. Each
    object carries ``x-amz-meta-job-id``, ``-event-id`` and ``-user-data`` (percent-encoded).
    Works with any S3-compatible store (``endpoint_url``: MinIO, R2, Ceph…); without credentials
    boto3's default chain (environment, profile, instance role) is used.
    """

    scheme = "s3"
    options: S3Options

    def __init__(
        self, name: str, options: S3Options, *, access_key_id: str | None, secret_access_key: str | None
    ) -> None:
        if (access_key_id is None) != (secret_access_key is None):
            raise ConfigError(
                f"sink {name}: set both {options.access_key_id_env} and {options.secret_access_key_env}, "
                "or neither to use boto3's default credentials"
            )
        self.name = name
        self.options = options
        self._credentials = tuple(value for value in (access_key_id, secret_access_key) if value)
        config = Config(
            connect_timeout=_CONNECT_TIMEOUT,
            read_timeout=_READ_TIMEOUT,
            max_pool_connections=_POOL_CONNECTIONS,
            # Minimal: one quick retry of the single failed request (say one part of 25) is far
            # cheaper than the worker restarting the whole upload; anything longer is the worker's
            # job, with its backoff, jitter, Retry-After and attempt limit.
            retries={"mode": "standard", "total_max_attempts": 2},
            # Self-hosted stores (MinIO, Ceph) rarely have wildcard DNS for virtual-hosted buckets.
            s3={"addressing_style": "path" if options.endpoint_url else "auto"},
            # botocore would presign with the deprecated SigV2 for some endpoints; every store takes v4.
            signature_version="s3v4",
        )
        try:
            # A session of its own: boto3's default session is shared and not thread-safe.
            self._client: Any = boto3.session.Session().client(
                "s3",
                region_name=options.region,
                endpoint_url=options.endpoint_url,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                config=config,
            )
        except (BotoCoreError, ValueError) as exc:
            raise ConfigError(f"sink {name}: {exc}") from None
        self._transfer = TransferConfig(
            multipart_threshold=options.multipart_threshold_mib * _MiB,
            multipart_chunksize=options.multipart_chunk_mib * _MiB,
            # Memory stays near max_concurrency times a read buffer whatever the file size: parts are
            # read from disk as they are sent, never buffered whole.
            max_concurrency=2,
            use_threads=True,
            # The CRT client (boto3[crt]) ignores these limits and sizes its own buffers.
            preferred_transfer_client="classic",
        )

    @classmethod
    def from_options(cls, name: str, options: S3Options, context: BuildContext) -> S3Sink:
        return cls(
            name,
            options,
            access_key_id=context.secret(name, options.access_key_id_env, required=False),
            secret_access_key=context.secret(name, options.secret_access_key_env, required=False),
        )

    def deliver(self, event: Event) -> None:
        """Upload each audio file (multipart when large) and check its size, then upload the JSON.

        A failure part way leaves the earlier files without a document listing them, until the
        retry overwrites them all and uploads it.
        """
        job = event.job
        metadata = user_metadata(event)
        for file, key in zip(event.files, audio_names(self.options.prefix, event), strict=True):
            fetched = file.fetched
            if fetched.path is None:
                raise DeliveryError(f"{self.name}: job {job.job_id}: the output was not downloaded", permanent=True)
            extra = {"ContentType": safe_content_type(fetched.content_type), "Metadata": metadata}
            # What is checked: botocore sends a CRC32 of every request body (each part, or the
            # whole object) and the store refuses a mismatch, so the stored bytes are the bytes
            # read; the size check below proves they were all of the file. The file itself was
            # checked against COS's CRC64 when it was fetched, so it is not read a second time.
            self._call(
                "upload",
                key,
                self._client.upload_file,
                fetched.path,
                self.options.bucket,
                key,
                ExtraArgs=extra,
                Config=self._transfer,
            )
            head = self._head(key)
            if head["ContentLength"] != fetched.size:
                raise DeliveryError(
                    f"{self.name}: {self._url(key)} holds {head['ContentLength']} bytes, expected {fetched.size}"
                )
        self._put_document(event, metadata)

    def location(
        self, job: Job, presign_seconds: int | None = None, file: JobFile | None = None
    ) -> FileLocation | None:
        """The audio's bucket and key, with a presigned GET URL when ``presign_seconds`` is given."""
        if not job.succeeded:
            return None
        key = audio_name(self.options.prefix, job, file)
        url = ""
        if presign_seconds:
            params = {"Bucket": self.options.bucket, "Key": key}
            url = self._call(
                "presign",
                key,
                self._client.generate_presigned_url,
                "get_object",
                Params=params,
                ExpiresIn=presign_seconds,
            )
        return FileLocation(kind="s3", bucket=self.options.bucket, key=key, region=self.options.region, url=url)

    def check(self) -> str:
        """HEAD the bucket: proves the endpoint answers, the bucket exists and the credentials may use it."""
        self._call("head_bucket", "", self._client.head_bucket, Bucket=self.options.bucket)
        return "reachable"

    def close(self) -> None:
        """Close pooled connections."""
        self._client.close()

    def _call(self, operation: str, key: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
            raise self._error(f"{self.name}: {operation} {self._url(key)}", exc) from exc
        except OSError as exc:  # reading the local file
            raise unreadable(self.name, exc) from exc

    def _error(self, where: str, exc: Exception) -> DeliveryError:
        # upload_file turns a ClientError into S3UploadFailedError, raised while handling it.
        cause = exc.__context__ if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None else exc
        if isinstance(cause, ClientError):
            error = cause.response.get("Error", {})
            response = cause.response.get("ResponseMetadata", {})
            status = int(response.get("HTTPStatusCode") or 0)
            code = str(error.get("Code") or status)
            reason = f"{code} (HTTP {status})"
            if message := printable(str(error.get("Message") or "")):
                reason += f" {message}"
            retryable = code in _RETRYABLE_CODES or status in (408, 429) or status >= 500
            retry_after = retry_after_seconds(response.get("HTTPHeaders", {}).get("retry-after"))
            return DeliveryError(self._scrub(f"{where}: {reason}"), retry_after=retry_after, permanent=not retryable)
        if isinstance(cause, ReadTimeoutError):
            return DeliveryError(f"{where}: no answer within {_READ_TIMEOUT:g}s")
        name = type(cause).__name__
        if isinstance(cause, _RETRYABLE_LOCAL):
            # Not str(cause): it quotes the request URL. The OS reason ("Connection refused") is enough.
            reason = os_reason(cause)
            return DeliveryError(f"{where}: {name}" + (f": {reason}" if reason != name else ""))
        # The rest say what to configure (NoCredentialsError, ParamValidationError…).
        return DeliveryError(self._scrub(f"{where}: {name}: {printable(str(cause))}"), permanent=True)

    def _scrub(self, message: str) -> str:
        for credential in self._credentials:
            message = message.replace(credential, "[redacted]")
        return message
