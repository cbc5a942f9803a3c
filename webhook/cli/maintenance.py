"""Commands an operator (or a scheduler) runs to keep the ledger whole and small: reconcile, prune."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import click

from webhook.cli.base import echo_text, main, open_ledger, parse_since
from webhook.cli.progress import Progress
from webhook.config import Settings
from webhook.ledger import utc_text, utcnow


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
        with Progress() as progress:
            summary = run_reconcile(settings, open_ledger(settings), since, progress)
    except ReconcileError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
        return
    for bucket in summary.buckets:
        for job_id in bucket.recorded:
            echo_text(f"recorded {job_id} ({bucket.bucket})")
    echo_text(summary.line())


@main.command()
@click.option(
    "--older-than",
    "before",
    callback=parse_since,
    help="Finished before this (30d, ISO time); default: retention.",
)
@click.option("--dry-run", is_flag=True, help="Only count what would go.")
def prune(before: datetime | None, dry_run: bool) -> None:
    """Remove finished jobs (delivered, failed, rejected, ignored) older than the retention, with their
    callbacks, tasks and attempts. Dead and undelivered work is never pruned."""
    settings = Settings.from_env()
    ledger = open_ledger(settings)
    before = before or utcnow() - timedelta(days=settings.retention_days)
    if dry_run:
        click.echo(f"would prune {ledger.retention.would_prune(before).line()} (before {utc_text(before)})")
        return
    with Progress() as progress:
        pruned = ledger.retention.prune(before, progress=lambda so_far: progress(f"pruning: {so_far.line()} so far"))
    click.echo(f"pruned {pruned.line()} (before {utc_text(before)})")
