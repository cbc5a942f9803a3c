"""DescribeMediaJobs (``GET /jobs``) for the sandbox: the query CI documents, and one page of its answer.

What cos-python-sdk-v5's ``ci_list_media_jobs`` sends, and CI's documented meaning of it:

- ``tag`` (required): only jobs with this tag;
- ``queueId``: only jobs of this queue (every queue when absent);
- ``states``: comma-separated ``Submitted``, ``Running``, ``Success``, ``Failed``, ``Pause``,
  ``Cancel``, or ``All`` (the default);
- ``startCreationTime`` / ``endCreationTime``: only jobs created after / before that time, written
  ``%Y-%m-%dT%H:%M:%S%z`` (``2001-01-01T00:00:00+0800``);
- ``orderByTime``: ``Desc`` (the default, newest first) or ``Asc``, by creation time;
- ``size``: at most this many jobs per answer, 10 by default, 100 at most;
- ``nextToken``: where the previous answer stopped.

The answer is ``<Response>`` with a ``<JobsDetail>`` per job (absent when there is none) and
``<NextToken>``, empty on the last page. A token names the last job listed, not an offset: jobs
submitted between two pages neither shift nor repeat the pages that follow.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from webhook.dev.sandbox.submission import JobRequestError

MAX_SIZE = 100
DEFAULT_SIZE = 10
STATES = frozenset({"Submitted", "Running", "Success", "Failed", "Pause", "Cancel"})
PARAMETERS = frozenset(
    {"tag", "queueId", "states", "startCreationTime", "endCreationTime", "orderByTime", "size", "nextToken"}
)
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}")
_TOKEN = re.compile(r"[0-9a-f]{8}")


@dataclass(frozen=True)
class JobQuery:
    """One DescribeMediaJobs request, checked."""

    tag: str
    queue_id: str  # "" for every queue
    states: frozenset[str]
    start: datetime | None
    end: datetime | None
    ascending: bool
    size: int
    after: int | None  # the position of the last job the previous page listed

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> JobQuery:
        """The query in ``params`` (the URL's, decoded); :class:`JobRequestError` says what is wrong."""
        tag = params.get("tag", "")
        if not tag:
            raise JobRequestError("InvalidArgument", "tag is required")
        order = params.get("orderByTime") or "Desc"
        if order not in ("Desc", "Asc"):
            raise JobRequestError("InvalidArgument", f"orderByTime must be Desc or Asc, not {order!r}")
        return cls(
            tag=tag,
            queue_id=params.get("queueId", ""),
            states=_states(params.get("states") or "All"),
            start=_time(params, "startCreationTime"),
            end=_time(params, "endCreationTime"),
            ascending=order == "Asc",
            size=_size(params.get("size") or str(DEFAULT_SIZE)),
            after=_position(params.get("nextToken", "")),
        )

    def matches(self, detail: Mapping[str, Any]) -> bool:
        created = _created(detail)
        return (
            detail["Tag"] == self.tag
            and (not self.queue_id or detail["QueueId"] == self.queue_id)
            and detail["State"] in self.states
            and (self.start is None or created > self.start)
            and (self.end is None or created < self.end)
        )


def list_jobs(details: list[dict[str, Any]], query: JobQuery) -> dict[str, Any]:
    """The ``<Response>`` to ``query`` over a bucket's jobs (``details``, in the order they were submitted)."""
    if query.after is not None and query.after >= len(details):
        raise JobRequestError("InvalidArgument", "nextToken is not one this API returned")

    def key(position: int) -> tuple[datetime, int]:
        # Jobs created in the same second keep the order they were submitted in.
        return _created(details[position]), position

    order = sorted(
        (position for position, detail in enumerate(details) if query.matches(detail)),
        key=key,
        reverse=not query.ascending,
    )
    if query.after is not None:
        last = key(query.after)
        order = [position for position in order if (key(position) > last if query.ascending else key(position) < last)]
    page, rest = order[: query.size], order[query.size :]
    answer: dict[str, Any] = {"JobsDetail": [details[position] for position in page]} if page else {}
    return answer | {"NextToken": f"{page[-1]:08x}" if rest else ""}


def _states(text: str) -> frozenset[str]:
    named = {state.strip() for state in text.split(",")}
    unknown = sorted(named - STATES - {"All"})
    if unknown:
        raise JobRequestError("InvalidArgument", f"states has {', '.join(map(repr, unknown))}: not a job state")
    return STATES if "All" in named else frozenset(named)


def _time(params: Mapping[str, str], name: str) -> datetime | None:
    text = params.get(name, "")
    if not text:
        return None
    if not _TIME.fullmatch(text):
        raise JobRequestError("InvalidArgument", f"{name} must be written like 2001-01-01T00:00:00+0800, not {text!r}")
    try:
        return datetime.strptime(text, _TIME_FORMAT)
    except ValueError:
        raise JobRequestError("InvalidArgument", f"{name} {text!r} is not a valid time") from None


def _size(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_SIZE:
        raise JobRequestError("InvalidArgument", f"size must be a whole number from 1 to {MAX_SIZE}, not {text!r}")
    return int(text)


def _position(token: str) -> int | None:
    if not token:
        return None
    if not _TOKEN.fullmatch(token):
        raise JobRequestError("InvalidArgument", "nextToken is not one this API returned")
    return int(token, 16)


def _created(detail: Mapping[str, Any]) -> datetime:
    return datetime.strptime(detail["CreationTime"], _TIME_FORMAT)
