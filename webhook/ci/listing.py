"""List a bucket's finished NoiseReduction jobs with the CI API (DescribeMediaJobs, ``GET /jobs``).

Tencent documents no retry of a callback that fails; this listing is the safety net that
:mod:`webhook.intake.reconcile` builds on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from qcloud_cos import CosS3Client

from webhook.ci.client import CI, SDK_ERRORS, CloudError, cloud_error
from webhook.intake.callback import CallbackError, parse_job
from webhook.models import Job, JobState

TAG = "NoiseReduction"
FINISHED = (JobState.SUCCESS, JobState.FAILED, JobState.CANCEL)
PAGE_SIZE = 100  # the largest page DescribeMediaJobs gives
_BEIJING = timezone(timedelta(hours=8))  # CI's examples write every time in UTC+8


@dataclass(frozen=True)
class Listed:
    """A job as DescribeMediaJobs listed it: parsed, and the ``JobsDetail`` element it came from."""

    job: Job
    detail: dict[str, Any]


def creation_time(when: datetime) -> str:
    """``when`` (naive UTC, or aware) as DescribeMediaJobs takes it: ``2001-01-01T08:00:00+0800``."""
    aware = when if when.tzinfo else when.replace(tzinfo=UTC)
    return aware.astimezone(_BEIJING).strftime("%Y-%m-%dT%H:%M:%S%z")


def list_finished(
    client: CosS3Client,
    bucket: str,
    start: str,
    queue_ids: Sequence[str],
    listed_so_far: Callable[[int], None] | None = None,
) -> list[Listed]:
    """Every finished job of ``bucket`` created after ``start``, of ``queue_ids`` (none: every queue), page by page;
    ``listed_so_far`` hears the count after each page.

    Raises :class:`~webhook.ci.client.CloudError` when CI cannot be asked or answers something unreadable.
    """
    listed: list[Listed] = []
    for queue_id in queue_ids or (None,):
        token = ""
        while True:
            answer = _list_page(client, bucket, start, queue_id, token)
            for index, item in enumerate(answer.get("JobsDetail") or []):
                try:
                    listed.append(Listed(parse_job(item, f"DescribeMediaJobs JobsDetail[{index}]"), item))
                except CallbackError as exc:
                    raise CloudError(f"unreadable DescribeMediaJobs answer: {exc.message}") from None
            if listed_so_far:
                listed_so_far(len(listed))
            next_token = answer.get("NextToken") or ""
            # The last page has an empty token; one that does not move on would page forever.
            if not next_token or next_token == token:
                break
            token = next_token
    return listed


def _list_page(client: CosS3Client, bucket: str, start: str, queue_id: str | None, token: str) -> dict[str, Any]:
    try:
        answer: dict[str, Any] = client.ci_list_media_jobs(
            Bucket=bucket,
            Tag=TAG,
            QueueId=queue_id,
            StartCreationTime=start,
            OrderByTime="Asc",
            States=",".join(FINISHED),
            Size=PAGE_SIZE,
            NextToken=token,
        )
    except SDK_ERRORS as exc:
        raise cloud_error(exc, CI) from None
    return answer
