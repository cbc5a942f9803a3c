"""Commands that look into the ledger and give jobs another chance: jobs, replay, reconcile, dead."""

from __future__ import annotations

import functools
import json
import sys
from datetime import datetime, timedelta
from typing import Any

import click

from webhook.cli.base import echo_text, main, open_ledger, parse_since, print_rows, sink_specs
from webhook.config import Settings
from webhook.ledger import DeadLetter, JobView, utcnow
from webhook.worker.replay import replay_job, replay_letter


@main.group()
def jobs() -> None:
    """Inspect jobs in the ledger."""


@jobs.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.option("--status", help="Only jobs with this status.")
@click.option("--limit", default=50, show_default=True)
def jobs_list(as_json: bool, status: str | None, limit: int) -> None:
    """List the most recent jobs."""
    print_rows(
        open_ledger(Settings.from_env()).views.list_jobs(limit=limit, status=status),
        as_json,
        _summary,
        f"{'JOB ID':<36} {'TAG':<16} {'STATE':<9} {'STATUS':<10} {'UPDATED':<20} REASON",
        lambda view: (
            f"{view.job_id:<36} {view.tag[:16]:<16} {view.state:<9} {view.status:<10} "
            f"{view.updated_at:%Y-%m-%d %H:%M:%S}  {view.reason}"
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
    requests = ledger.views.raw_callbacks(job_id) if raw else []
    if raw:
        data["raw"] = [
            {
                "callback_id": r.id,
                "received_at": r.received_at.isoformat() + "Z",
                "remote_addr": r.remote_addr,
                "content_type": r.content_type,
                "body": r.body.decode("utf-8", "replace"),
            }
            for r in requests
        ]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key in ("job_id", "tag", "event_name", "state", "status", "reason", "created_at", "updated_at"):
        echo_text(f"{key + ':':<12} {data[key]}")
    if view.job is None:
        echo_text(f"{'detail:':<12} {view.unreadable}")
    elif (output := view.job.output) is not None:
        echo_text(f"{'output:':<12} {output.bucket}/{output.key} ({output.region})")
    for version in data["callbacks"]:
        outcome = version["status"] + (f" ({version['reason']})" if version["reason"] else "")
        echo_text(f"{'callback:':<12} #{version['callback_id']} at {version['received_at']}: {outcome}")
    for step in data["verify"]:
        echo_text(f"{'verify:':<12} {_step(step)}")
    for delivery in data["deliveries"]:
        echo_text(f"{'delivery:':<12} {delivery['sink']}: {_step(delivery)}")
    if view.attempts:
        click.echo("attempts:")
    for a in view.attempts:
        what = f"{a.step} {a.sink}" if a.sink else a.step
        code = f" [{a.code}]" if a.code else ""
        error = f" {a.error}" if a.error else ""
        echo_text(f"  {a.started_at:%Y-%m-%d %H:%M:%S} {what:<24} {a.outcome:<9} {a.duration_ms:>7}ms{code}{error}")
    for r in requests:
        echo_text(f"request #{r.id} at {r.received_at:%Y-%m-%d %H:%M:%S} from {r.remote_addr} ({r.content_type}):")
        # Line by line, each behind a gutter: a body cannot pass for this command's own output.
        for line in r.body.decode("utf-8", "replace").splitlines():
            echo_text(f"  | {line}")


@main.command()
@click.argument("job_id", required=False)
@click.option("--sink", "sinks", multiple=True, help="Only this sink (repeatable); default every sink that takes it.")
@click.option("--dead", is_flag=True, help="Replay every dead letter: verify again, or deliver again to its sink.")
@click.option("--rejected", is_flag=True, help="Verify every rejected job again.")
@click.option("--since", callback=parse_since, help="With --dead or --rejected: only those since (2h, 3d, ISO time).")
def replay(job_id: str | None, sinks: tuple[str, ...], dead: bool, rejected: bool, since: datetime | None) -> None:
    """Give a job another chance: verify it again if it was rejected or its verification died,
    else deliver it again; or do so for every dead letter (--dead) or rejected job (--rejected)."""
    settings = Settings.from_env()
    specs = sink_specs(settings)
    unknown = [s for s in sinks if s not in specs]
    if unknown:
        raise click.ClickException(f"unknown sink {unknown[0]!r}; configured: {', '.join(specs) or 'none'}")
    if [bool(job_id), dead, rejected].count(True) != 1:
        raise click.UsageError("give a JOB_ID, --dead or --rejected")
    ledger = open_ledger(settings)
    if job_id:
        replayed = replay_job(ledger, specs, job_id, sinks)
        if replayed.verify:
            click.echo(f"{job_id} will be verified again, then delivered to every sink that takes it")
        else:
            click.echo(f"replay of {job_id} scheduled for: {', '.join(replayed.sinks) or 'no sink'}")
        return
    if dead:
        letters = [d for d in ledger.views.dead_letters(since=since) if not sinks or d.sink in sinks]
        todo = [functools.partial(replay_letter, ledger, letter) for letter in letters]
        what = "dead letters"
    else:
        rejected_ids = ledger.views.rejected_jobs(since=since)
        todo = [functools.partial(ledger.jobs.replay, rejected_id, []) for rejected_id in rejected_ids]
        what = "rejected jobs"
    with click.progressbar(todo, label=f"replaying {what}", show_pos=True, file=sys.stderr) as bar:
        for replay_one in bar:
            replay_one()
    click.echo(f"{len(todo)} {what} scheduled again")


@main.command()
@click.option("--since", default="24h", show_default=True, callback=parse_since, help="Jobs created since (2h).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def reconcile(since: datetime, as_json: bool) -> None:
    """Find finished jobs whose callback never came (CI's job list) and record them for the worker."""
    from webhook.intake.reconcile import ReconcileError
    from webhook.intake.reconcile import reconcile as run_reconcile

    settings = Settings.from_env()
    settings.check_worker()
    try:
        summary = run_reconcile(settings, open_ledger(settings), since)
    except ReconcileError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
        return
    for bucket in summary.buckets:
        for job_id in bucket.recorded:
            echo_text(f"recorded {job_id} ({bucket.bucket})")
    echo_text(summary.line())


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
        f"{'JOB ID':<36} {'KIND':<7} {'SINK':<16} {'ATTEMPTS':>8} {'DEAD SINCE':<20} LAST ERROR",
        lambda letter: (
            f"{letter.job_id:<36} {letter.kind:<7} {letter.sink or '-':<16} {letter.attempts:>8} "
            f"{letter.dead_at:%Y-%m-%d %H:%M:%S}  {letter.last_error}"
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
            f"{kept.received_at:%Y-%m-%d %H:%M:%S}  {kept.queue}/{kept.msg_id}: {kept.reason}"
        )


def _summary(view: JobView) -> dict[str, Any]:
    data = view.to_dict()
    return {k: data[k] for k in ("job_id", "tag", "state", "status", "reason", "created_at", "updated_at")}


def _step(step: dict[str, Any]) -> str:
    text = f"{step['status']} attempts={step['attempts']}"
    if step["next_attempt_at"]:
        text += f" next={step['next_attempt_at']}"
    if step["last_error"]:
        text += f" last_error={step['last_error']}"
    return text


@main.command()
@click.option(
    "--older-than",
    "before",
    callback=parse_since,
    help="Finished before this (30d, ISO time); default: retention.",
)
@click.option("--dry-run", is_flag=True, help="Only count what would go.")
def prune(before: datetime | None, dry_run: bool) -> None:
    """Remove finished jobs (delivered, rejected, ignored) older than the retention, with their
    callbacks, tasks and attempts. Dead and undelivered work is never pruned."""
    settings = Settings.from_env()
    ledger = open_ledger(settings)
    before = before or utcnow() - timedelta(days=settings.retention_days)
    if dry_run:
        click.echo(f"would prune {ledger.retention.would_prune(before).line()} (before {before:%Y-%m-%d %H:%M:%S})")
        return
    click.echo(f"pruned {ledger.retention.prune(before).line()} (before {before:%Y-%m-%d %H:%M:%S})")
