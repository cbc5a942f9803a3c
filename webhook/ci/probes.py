"""Which of the calls a worker makes may its credentials make? One cheap, harmless call per CAM action.

Each probe asks for something that does not exist (a job, an object) or for as little as there
is (a job list of one): "not found" or an answer means the action is allowed, ``403`` that a
policy denies it. Writes (a cos sink's ``cos:PutObject``) are not probed: only a write shows
that one is allowed, and ``check`` writes nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from qcloud_cos import CosS3Client

from webhook.ci.client import CI, COS, SDK_ERRORS, Api, CloudError, cloud_error, cos_deadline
from webhook.ci.listing import TAG

NO_JOB = "j" + "0" * 32  # the shape of a JobId, and none CI ever gives
PROBE_PREFIX = "cos-webhook-check/"  # no object under it is expected to exist


@dataclass(frozen=True)
class Permission:
    """Whether the credentials may make ``action`` on ``bucket``; ``problem`` says why not ("": they may)."""

    action: str
    bucket: str
    problem: str = ""

    def line(self) -> str:
        """``ok``/``FAIL`` with the action and the bucket, as ``cos-webhook check`` prints it."""
        if self.problem:
            return f"FAIL  permission: {self.action} on {self.bucket}: {self.problem}"
        return f"ok    permission: {self.action} on {self.bucket}"


def worker_permissions(client: CosS3Client, bucket: str) -> list[Permission]:
    """Probe each action a worker needs on ``bucket`` (one of WEBHOOK_ALLOWED_BUCKETS)."""
    key = PROBE_PREFIX + uuid.uuid4().hex
    probes: list[tuple[str, Api, Callable[[], object]]] = [
        ("ci:DescribeMediaJob", CI, lambda: client.ci_get_media_jobs(Bucket=bucket, JobIDs=NO_JOB)),
        ("ci:DescribeMediaJobs", CI, lambda: client.ci_list_media_jobs(Bucket=bucket, Tag=TAG, Size=1)),
        ("cos:HeadObject", COS, lambda: client.head_object(Bucket=bucket, Key=key)),
        ("cos:GetObject", COS, lambda: client.get_object(Bucket=bucket, Key=key)["Body"].get_raw_stream().close()),
    ]
    return [Permission(action, bucket, _problem(client, api, call)) for action, api, call in probes]


def _problem(client: CosS3Client, api: Api, call: Callable[[], object]) -> str:
    try:
        with cos_deadline(client, api.address):
            call()
    except SDK_ERRORS as exc:
        error: CloudError = cloud_error(exc, api)
        if error.status == 404:  # NoSuchKey, or a job or bucket CI does not know: asked, and allowed to
            return ""
        # A HEAD's 403 has no body, so no code: only a policy refuses a correctly signed request so.
        denied = error.status == 403 and error.code in ("AccessDenied", "")
        return f"denied: {error}" if denied else str(error)
    return ""
