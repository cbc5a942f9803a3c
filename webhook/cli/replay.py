"""``replay``: give a job, every dead letter or every rejected job another chance."""

from __future__ import annotations

import functools
import getpass
import socket
import sys
from datetime import datetime

import click

from webhook.cli.base import main, open_ledger, parse_since, sink_specs
from webhook.config import Settings
from webhook.worker.replay import replay_job, replay_letter


def asker() -> str:
    """Who asked, as the replayed job's timeline names it: the operator's account on this machine."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a name
        user = "?"
    return f"cli {user}@{socket.gethostname()}"


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
    by = asker()
    if job_id:
        replayed = replay_job(ledger, specs, job_id, sinks, by)
        if replayed.verify:
            click.echo(f"{job_id} will be verified again: delivered if CI now confirms it, else rejected again")
        else:
            click.echo(f"replay of {job_id} scheduled for: {', '.join(replayed.sinks) or 'no sink'}")
        return
    if dead:
        letters = [d for d in ledger.views.dead_letters(since=since) if not sinks or d.sink in sinks]
        todo = [functools.partial(replay_letter, ledger, letter, by) for letter in letters]
        what = "dead letters"
    else:
        rejected_ids = ledger.views.rejected_jobs(since=since)
        todo = [functools.partial(ledger.jobs.replay, rejected_id, [], by) for rejected_id in rejected_ids]
        what = "rejected jobs"
    with click.progressbar(todo, label=f"replaying {what}", show_pos=True, file=sys.stderr) as bar:
        for replay_one in bar:
            replay_one()
    click.echo(f"{len(todo)} {what} scheduled again")
