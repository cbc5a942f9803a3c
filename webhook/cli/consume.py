"""Commands for callbacks that come through TDMQ: ``consume``, and ``messages`` for those that could not be read."""

from __future__ import annotations

import json
from datetime import datetime

import click

from webhook.cli.base import echo_text, main, open_ledger, parse_since, print_rows
from webhook.config import Settings
from webhook.intake.tdmq import MAX_BATCH, MAX_WAIT
from webhook.ledger import Ledger, utc_text
from webhook.ledger.quarantine import KeptMessage
from webhook.telemetry.logs import setup_logging


@main.command()
@click.option("--batch", type=click.IntRange(1, MAX_BATCH), default=MAX_BATCH, show_default=True, help="numOfMsg.")
@click.option(
    "--wait",
    type=click.IntRange(0, MAX_WAIT),
    default=MAX_WAIT,
    show_default=True,
    help="Seconds a receive waits for a message (long polling).",
)
def consume(batch: int, wait: int) -> None:
    """Receive CI's callbacks from the TDMQ (CMQ) queues of WEBHOOK_TDMQ_QUEUE and record them."""
    from webhook.intake.consumer import Consumer, ConsumerStopped
    from webhook.intake.tdmq import CmqClient

    settings = Settings.from_env()
    setup_logging(settings.log_level, settings.log_format)
    client = CmqClient.from_settings(settings)
    ledger = Ledger(settings.database_url)
    try:
        ledger.prepare(settings.auto_migrate)
        consumer = Consumer(
            client,
            ledger,
            settings.tdmq_queues,
            settings.allowed_tags,
            batch=batch,
            wait=wait,
            shutdown_seconds=settings.shutdown_seconds,
            max_versions=settings.max_versions_per_job,
        )
        consumer.install_signal_handlers()
        consumer.run()
    except ConsumerStopped as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        client.close()
        ledger.dispose()


@main.group()
def messages() -> None:
    """Queue messages that were not a readable callback: kept with the reason, never lost."""


@messages.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.option("--all", "everything", is_flag=True, help="Also those recorded after a re-parse.")
@click.option("--since", callback=parse_since, help="Only those handed over since (2h, 3d, or ISO time).")
def messages_list(as_json: bool, everything: bool, since: datetime | None) -> None:
    """List kept messages: queue, msgId, deliveries and why they could not be read."""
    kept = open_ledger(Settings.from_env()).quarantine.listed(None if everything else "quarantined", since)
    print_rows(
        kept,
        as_json,
        KeptMessage.to_dict,
        f"{'ID':>6} {'QUEUE':<24} {'MSG ID':<36} {'STATUS':<11} {'TIMES':>5} {'RECEIVED':<21} REASON",
        lambda m: (
            f"{m.id:>6} {m.queue[:24]:<24} {m.msg_id[:36]:<36} {m.status:<11} {m.deliveries:>5} "
            f"{utc_text(m.received_at)}  {m.reason}"
        ),
    )


@messages.command("show")
@click.argument("message_id", type=int)
@click.option("--json", "as_json", is_flag=True)
def messages_show(message_id: int, as_json: bool) -> None:
    """Show one kept message with its body as the queue handed it over."""
    kept = open_ledger(Settings.from_env()).quarantine.get(message_id)
    data = kept.to_dict(body=True)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key in ("id", "queue", "msg_id", "status", "reason", "deliveries", "callback_id", "received_at"):
        echo_text(f"{key + ':':<13} {data[key]}")
    echo_text("body:")
    # Behind a gutter, line by line: a body cannot pass for this command's own output.
    for line in data["body"].splitlines():
        echo_text(f"  | {line}")


@messages.command("reparse")
@click.argument("message_ids", nargs=-1, type=int)
@click.option("--all", "everything", is_flag=True, help="Every message still quarantined.")
def messages_reparse(message_ids: tuple[int, ...], everything: bool) -> None:
    """Read kept messages again (after a fix) and record those that are callbacks now."""
    from webhook.intake.consumer import reparse

    if bool(message_ids) == everything:
        raise click.UsageError("give message ids or --all")
    settings = Settings.from_env()
    ledger = open_ledger(settings)
    quarantine = ledger.quarantine
    todo = quarantine.listed() if everything else [quarantine.get(i) for i in message_ids]
    still = 0
    for kept in todo:
        if kept.status != "quarantined":
            echo_text(f"message {kept.id}: already recorded as callback {kept.callback_id}")
            continue
        outcome = reparse(ledger, settings.allowed_tags, kept, settings.max_versions_per_job)
        still += not outcome.ok
        echo_text(f"message {kept.id}: {outcome.detail if outcome.ok else 'still unreadable: ' + outcome.detail}")
    if still:
        raise click.ClickException(f"{still} of {len(todo)} messages are still unreadable")
