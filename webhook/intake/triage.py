"""Which jobs of a received callback are verified and forwarded, and which are only recorded (pure)."""

from __future__ import annotations

from webhook.models import Callback, Triaged

FORWARDED_EVENT = "TaskFinish"
# A workflow run reports its tasks' jobs: a team whose only callback is the workflow's still gets its files.
FORWARDED_EVENTS = frozenset({FORWARDED_EVENT, "WorkflowFinish"})


def triage(callback: Callback, allowed_tags: frozenset[str]) -> tuple[Triaged, ...]:
    """Forward the jobs of finished tasks and workflow runs that have an allowed tag; record everything
    else as ignored, saying why."""
    if callback.event_name not in FORWARDED_EVENTS:
        reason = f"event {callback.event_name} is recorded, not forwarded"
        return tuple(Triaged(job, forward=False, reason=reason) for job in callback.jobs)
    return tuple(
        Triaged(job, forward=True)
        if job.tag in allowed_tags
        else Triaged(job, forward=False, reason=f"tag {job.tag} is not in WEBHOOK_ALLOWED_TAGS")
        for job in callback.jobs
    )
