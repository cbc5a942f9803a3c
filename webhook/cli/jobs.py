"""Commands that look into the ledger, changing nothing: jobs list, jobs show, jobs sinks, dead list."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import click

from webhook.cli.base import echo_text, main, open_ledger, parse_since, print_rows, sink_specs
from webhook.config import Settings
from webhook.ledger import Breaker, DeadLetter, JobView, TaskGroup, utc_text
from webhook.models import JobStatus, Outcome, TaskKind


@main.group()
def jobs() -> None:
    """Inspect jobs in the ledger."""


@jobs.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.option("--status", type=click.Choice([status.value for status in JobStatus]), help="Only jobs with this status.")
@click.option("--limit", default=50, show_default=True)
def jobs_list(as_json: bool, status: str | None, limit: int) -> None:
    """List the most recent jobs."""
    print_rows(
        open_ledger(Settings.from_env()).views.list_jobs(limit=limit, status=status),
        as_json,
        _summary,
        f"{'JOB ID':<36} {'TAG':<16} {'STATE':<9} {'STATUS':<10} {'UPDATED':<21} REASON",
        lambda view: (
            f"{view.job_id:<36} {view.tag[:16]:<16} {view.state:<9} {view.status:<10} "
            f"{_when(view.updated_at):<20}  {'; '.join(filter(None, (view.reason, view.unreadable)))}"
        ),
    )


@jobs.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@click.option("--raw", is_flag=True, help="Also print the stored requests that named the job.")
def jobs_show(job_id: str, as_json: bool, raw: bool) -> None:
    """Show one job: its callbacks, verification, deliveries and the timeline of every attempt."""
    ledger = open_ledger(Settings.from_env())
    view = ledger.views.show_job(job_id)
    data = view.to_dict()
    # A delivery still to come whose sink's breaker is not closed waits for it, spending no attempt.
    paused = {sink: b for sink, b in ledger.breakers.all().items() if b.state != "closed"}
    for delivery in data["deliveries"]:
        if delivery["status"] == "pending" and (breaker := paused.get(delivery["sink"])) is not None:
            until = None if breaker.until is None else utc_text(breaker.until)
            delivery["breaker"] = {"state": breaker.state.value, "until": until}
    requests = ledger.views.raw_callbacks(job_id) if raw else []
    if raw:
        data["raw"] = [
            {
                "callback_id": r.id,
                "received_at": None if r.received_at is None else r.received_at.isoformat() + "Z",
                "remote_addr": r.remote_addr,
                "content_type": r.content_type,
                "body": r.body.decode("utf-8", "replace"),
            }
            | ({"unreadable": r.unreadable} if r.unreadable else {})
            for r in requests
        ]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key in ("job_id", "tag", "event_name", "state", "status", "reason", "created_at", "updated_at"):
        echo_text(f"{key + ':':<12} {_seconds(data[key]) if key.endswith('_at') else data[key]}")
    if view.unreadable:  # the stored detail, or a typed column, holds what cannot be read
        echo_text(f"{'unreadable:':<12} {view.unreadable}")
    if view.job is not None:  # what the operator asks first: which file, and whose (user data)
        for name, where in (("input", view.job.input), ("output", view.job.output)):
            if where is not None:
                echo_text(f"{name + ':':<12} {where.bucket}/{where.key} ({where.region})")
        if view.job.user_data:
            echo_text(f"{'user_data:':<12} {view.job.user_data}")
    for version in data["callbacks"]:
        outcome = version["status"] + (f" ({version['reason']})" if version["reason"] else "")
        echo_text(f"{'callback:':<12} #{version['callback_id']} at {_seconds(version['received_at'])}: {outcome}")
    for step in data["verify"]:
        echo_text(f"{'verify:':<12} {_step(step)}")
    for delivery in data["deliveries"]:
        waits = ""
        if breaker := delivery.get("breaker"):
            waits = f" (sink {breaker['state']} until {breaker['until'] or '-'}: waiting, no attempt spent)"
        echo_text(f"{'delivery:':<12} {delivery['sink']}: {_step(delivery)}{waits}")
    if view.attempts:
        click.echo("attempts:")
    for a in view.attempts:
        what = f"{a.step} {a.sink}" if a.sink else a.step
        code = f" [{a.code}]" if a.code else ""
        error = f" {a.error}" if a.error else ""
        error += f" by {a.worker_id}" if a.outcome == Outcome.REPLAYED else ""
        echo_text(f"  {_when(a.started_at)} {what:<24} {a.outcome:<9} {a.duration_ms!s:>7}ms{code}{error}")
    for r in requests:
        unreadable = f" [{r.unreadable}]" if r.unreadable else ""
        echo_text(f"request #{r.id} at {_when(r.received_at)}{unreadable} from {r.remote_addr} ({r.content_type}):")
        # Line by line, each behind a gutter: a body cannot pass for this command's own output.
        for line in r.body.decode("utf-8", "replace").splitlines():
            echo_text(f"  | {line}")


@jobs.command("sinks")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def jobs_sinks(as_json: bool) -> None:
    """Each sink's circuit breaker (closed, open: paused, probing) and its deliveries due now."""
    settings = Settings.from_env()
    stats = open_ledger(settings).stats.snapshot(settings.heartbeat_seconds)
    names = sorted(set(sink_specs(settings)) | set(stats.breakers))

    def row(sink: str) -> dict[str, Any]:
        breaker = stats.breakers.get(sink, Breaker(sink))
        until = None if breaker.until is None else utc_text(breaker.until)
        due = stats.due.get(TaskGroup(TaskKind.DELIVER.value, sink), 0)
        return {"sink": sink, "breaker": breaker.state.value, "failures": breaker.failures, "until": until, "due": due}

    print_rows(
        [row(sink) for sink in names],
        as_json,
        lambda r: r,
        f"{'SINK':<24} {'BREAKER':<8} {'FAILURES':>8} {'DUE':>6}  UNTIL",
        lambda r: f"{r['sink']:<24} {r['breaker']:<8} {r['failures']:>8} {r['due']:>6}  {r['until'] or '-'}",
    )


@main.group()
def dead() -> None:
    """Dead letters: verifications and deliveries that ran out of attempts or were refused for good."""


@dead.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.option("--sink", help="Only this sink's deliveries.")
@click.option("--since", callback=parse_since, help="Only those that died after this (2h, 3d, or ISO time).")
def dead_list(as_json: bool, sink: str | None, since: datetime | None) -> None:
    """List dead verifications and deliveries with their last error, and unreadable queue messages."""
    ledger = open_ledger(Settings.from_env())
    print_rows(
        ledger.views.dead_letters(sink=sink, since=since),
        as_json,
        DeadLetter.to_dict,
        f"{'JOB ID':<36} {'KIND':<7} {'SINK':<16} {'ATTEMPTS':>8} {'DEAD SINCE':<21} LAST ERROR",
        lambda letter: (
            f"{letter.job_id:<36} {letter.kind:<7} {letter.sink or '-':<16} {letter.attempts!s:>8} "
            f"{_when(letter.dead_at):<20}  {letter.last_error}"
        ),
    )
    if sink is not None:
        return
    # A TDMQ message that is not a readable callback has no job: `messages show|reparse ID`.
    for kept in ledger.quarantine.listed(since=since):
        if as_json:
            click.echo(json.dumps({"kind": "message"} | kept.to_dict()))
            continue
        echo_text(
            f"{f'message {kept.id}':<36} {'message':<7} {'-':<16} {kept.deliveries:>8} "
            f"{utc_text(kept.received_at)}   {kept.queue}/{kept.msg_id}: {kept.reason}"
        )


def _summary(view: JobView) -> dict[str, Any]:
    data = view.to_dict()
    keys = ("job_id", "tag", "state", "status", "reason", "created_at", "updated_at")
    return {k: data[k] for k in keys} | ({"unreadable": view.unreadable} if view.unreadable else {})


def _when(value: datetime | None) -> str:
    return "-" if value is None else utc_text(value)


def _seconds(stamp: str | None) -> str:
    """A JSON view's time (ISO, microseconds, ``Z``) as the text lines print every time."""
    if not stamp:
        return "-"
    try:
        return utc_text(datetime.fromisoformat(stamp.removesuffix("Z")))
    except ValueError:  # a stored value that is not a time is shown as it is
        return stamp


def _step(step: dict[str, Any]) -> str:
    text = f"{step['status']} attempts={step['attempts']}"
    if step["next_attempt_at"]:
        text += f" next={_seconds(step['next_attempt_at'])}"
    if step["last_error"]:
        text += f" last_error={step['last_error']}"
    if "unreadable" in step:
        text += f" unreadable={step['unreadable']}"
    return text
