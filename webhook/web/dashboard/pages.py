"""The pages that only read: overview, jobs, one job, dead letters, workers. All of it from the ledger."""

from __future__ import annotations

from datetime import datetime, timedelta

from flask import abort, current_app, render_template, request

from webhook.ledger import STALE_BEATS, JobFilter, UnknownJob, utcnow
from webhook.models import JobState, JobStatus, TaskKind
from webhook.web.common import Runtime, runtime
from webhook.web.dashboard.blueprint import bp
from webhook.web.dashboard.detail import callback_entries, event_documents, lanes, verified

PER_PAGE = 50
MAX_PAGE = 100_000  # keeps the offset within what every database takes
FILTERS = ("q", "status", "state", "tag", "sink", "since", "until", "refresh")
DEAD_SHOWN = 500  # dead letters listed (and replayable together) at once
RECENT = timedelta(hours=1)
# Statuses whose job can be delivered (or verified) again; received and ignored have nothing to replay.
REPLAYABLE = frozenset({JobStatus.VERIFIED, JobStatus.DELIVERED, JobStatus.FAILED, JobStatus.DEAD, JobStatus.REJECTED})


def _rt() -> Runtime:
    return runtime(current_app)


def _stale_after() -> timedelta:
    # The workers' own rule: a few missed heartbeats and a worker is taken for dead.
    return timedelta(seconds=STALE_BEATS * _rt().settings.heartbeat_seconds)


@bp.get("/")
def overview() -> str:
    rt = _rt()
    now = utcnow()
    stats = rt.ledger.stats.snapshot(rt.settings.heartbeat_seconds)
    backlog = [
        (group, stats.due.get(group, 0), stats.oldest_due_seconds.get(group), stats.dead.get(group, 0))
        for group in stats.groups
    ]
    return render_template(
        "overview.html",
        page="overview",
        stats=stats,
        backlog=backlog,
        recent=rt.ledger.browse.attempts_since(now - RECENT),
        stale=max(0, len(rt.ledger.workers.live()) - stats.live_workers),
    )


@bp.get("/jobs")
def jobs() -> str:
    args = request.args
    now = utcnow()
    problems: list[str] = []
    times = {}
    for name in ("since", "until"):
        try:
            times[name] = parse_when(args.get(name, ""), now)
        except ValueError as exc:
            times[name] = None
            problems.append(f"{name}: {exc}")
    wanted = JobFilter(
        status=args.get("status", ""),
        state=args.get("state", ""),
        tag=args.get("tag", ""),
        sink=args.get("sink", ""),
        since=times["since"],
        until=times["until"],
        search=args.get("q", "").strip(),
    )
    page = args.get("page", "1")
    browse = _rt().ledger.browse
    found = browse.find_jobs(wanted, min(int(page), MAX_PAGE) if page.isdigit() else 1, PER_PAGE)
    configured = [spec.name for spec in _rt().settings.sink_specs()]
    # Only these go back into the page links: url_for reads some names (_external, _scheme) itself.
    filters = {k: v for k, v in args.items() if k in FILTERS and v}
    return render_template(
        "jobs.html",
        page="jobs",
        found=found,
        filters=filters,
        problems=problems,
        statuses=list(JobStatus),
        states=list(JobState),
        tags=browse.tags(),
        sinks=sorted(set(configured) | set(browse.delivery_sinks())),
    )


@bp.get("/jobs/<job_id>")
def job(job_id: str) -> str:
    ledger = _rt().ledger
    try:
        view = ledger.views.show_job(job_id)
    except UnknownJob:
        abort(404, "No job with this JobId is in the ledger.")
    configured = {spec.name for spec in _rt().settings.sink_specs()}
    return render_template(
        "job.html",
        page="jobs",
        view=view,
        callbacks=callback_entries(view, ledger.views.raw_callbacks(job_id)),
        lanes=lanes(view),
        documents=event_documents(view),
        verified=verified(view),
        replayable=view.status in REPLAYABLE,
        configured=configured,
    )


@bp.get("/dead")
def dead() -> str:
    kind, sink = request.args.get("kind", ""), request.args.get("sink", "")
    everything = _rt().ledger.views.dead_letters()
    letters = everything
    if kind:
        letters = [d for d in letters if d.kind == kind]
    if sink:
        letters = [d for d in letters if d.sink == sink]
    sinks = sorted({d.sink for d in everything if d.sink} | ({sink} - {""}))
    return render_template(
        "dead.html",
        page="dead",
        letters=letters[:DEAD_SHOWN],
        matching=len(letters),
        everything=len(everything),
        kinds=list(TaskKind),
        sinks=sinks,
        kind=kind,
        sink=sink,
        back=request.full_path.rstrip("?"),
    )


@bp.get("/workers")
def workers() -> str:
    now = utcnow()
    return render_template(
        "workers.html",
        page="workers",
        workers=_rt().ledger.workers.live(),
        leases=_rt().ledger.browse.leases(now),
        stale_after=_stale_after(),
        now=now,
    )


def parse_when(text: str, now: datetime) -> datetime | None:
    """``2h``, ``30m``, ``3d`` ago, or an ISO date/time in UTC; None for an empty field.

    Raises :class:`ValueError` saying what is accepted.
    """
    text = text.strip()
    if not text:
        return None
    units = {"m": "minutes", "h": "hours", "d": "days"}
    if text[:-1].isdigit() and text[-1:] in units:
        return now - timedelta(**{units[text[-1]]: int(text[:-1])})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration like 2h or 3d nor an ISO date/time (UTC)") from None
    return when.replace(tzinfo=None) - (when.utcoffset() or timedelta())
