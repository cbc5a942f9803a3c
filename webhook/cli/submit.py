"""Commands that hand work to CI with this service as its callback: submit, queue show, queue register."""

from __future__ import annotations

import json

import click

from webhook.ci.queue import QueueView, list_queues, register
from webhook.ci.submit import (
    SubmitError,
    callback_queue,
    callback_url,
    choose_bucket,
    ci_client,
    follow,
    submit_job,
)
from webhook.cli.base import echo_text, main
from webhook.config import Settings
from webhook.ledger import Ledger
from webhook.telemetry.logs import escape

_FORMAT = click.Choice(["JSON", "XML"], case_sensitive=False)
_BUCKET_HELP = "BucketName-APPID; default: the only bucket of WEBHOOK_ALLOWED_BUCKETS."


@main.command("submit")
@click.argument("source", metavar="PATH_OR_KEY")
@click.option("--output", "output_key", required=True, metavar="KEY", help="Key of the denoised object.")
@click.option("--bucket", help=_BUCKET_HELP)
@click.option("--input-key", metavar="KEY", help="Where a local file is uploaded; default input/<file name>.")
@click.option(
    "--callback",
    "callback_from",
    type=click.Choice(["job", "queue"]),
    default="job",
    show_default=True,
    help="job: the job's CallBack is WEBHOOK_PUBLIC_URL/callback/<token>; "
    "queue: no CallBack, the queue's NotifyConfig calls back (see queue register).",
)
@click.option(
    "--callback-type",
    type=click.Choice(["url", "tdmq"], case_sensitive=False),
    default="url",
    show_default=True,
    help="With --callback job: url POSTs the callback here; tdmq has CI put it on the TDMQ queue "
    "(the first of WEBHOOK_TDMQ_QUEUE, in WEBHOOK_TDMQ_REGION) for cos-webhook consume.",
)
@click.option(
    "--format",
    "callback_format",
    type=_FORMAT,
    help="CallBackFormat; default JSON, or with --callback queue the queue's ResultFormat.",
)
@click.option("--template-id", default="", help="Use this NoiseReduction template instead of a 16 kHz WAV.")
@click.option("--user-data", default="", help="UserData, handed back in the callback and to the sinks.")
@click.option("--wait", is_flag=True, help="Follow the job in the ledger until it is delivered or stops.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=600.0,
    show_default=True,
    help="With --wait: give up after this many seconds.",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.01),
    default=1.0,
    show_default=True,
    help="With --wait: seconds between looks at the ledger.",
)
def submit_command(
    source: str,
    output_key: str,
    bucket: str | None,
    input_key: str | None,
    callback_from: str,
    callback_type: str,
    callback_format: str | None,
    template_id: str,
    user_data: str,
    wait: bool,
    timeout: float,
    interval: float,
) -> None:
    """Submit a NoiseReduction job for PATH_OR_KEY (a local file is uploaded first) that calls back
    here, and print its JobId. With --wait, exit 0 once the job is delivered, 3 if CI reports it failed,
    1 if it stopped elsewhere or the wait timed out."""
    settings = Settings.from_env()
    ledger = None
    if wait:
        # Read-only, and before anything is submitted: a ledger that cannot be read (or has no
        # tables yet) stops the command here, with exit status 2.
        ledger = Ledger(settings.database_url)
        ledger.views.list_jobs(limit=1)
    tdmq = callback_type.lower() == "tdmq"
    if tdmq and callback_from == "queue":
        raise click.UsageError("--callback-type sets the job's own callback; with --callback queue the queue's decides")
    try:
        mq = callback_queue(settings) if tdmq else None
        url = callback_url(settings) if callback_from == "job" and not tdmq else ""
        if (url or mq) and callback_format is None:
            callback_format = "JSON"
        chosen = choose_bucket(settings, bucket)
        submitted = submit_job(
            ci_client(settings),
            settings,
            source,
            output_key,
            bucket=chosen,
            callback=url,
            callback_format=callback_format,
            input_key=input_key,
            template_id=template_id,
            user_data=user_data,
            callback_mq=mq,
        )
    except SubmitError as exc:
        raise click.ClickException(str(exc)) from None
    if submitted.uploaded_from is not None:
        _note(f"uploaded {submitted.uploaded_from} to {submitted.bucket}/{submitted.input_key}")
    click.echo(submitted.job_id)
    if ledger is None:
        return
    try:
        outcome = follow(ledger.views, submitted.job_id, timeout, _note, interval)
    finally:
        ledger.dispose()
    if not outcome.ok:
        click.echo(f"Error: {escape(outcome.line)}", err=True)  # as a ClickException, with its own status
        raise click.exceptions.Exit(outcome.exit_code)
    _note(outcome.line)


@main.group()
def queue() -> None:
    """The Speeching queue's notification: CI calls back here for every job on it."""


@queue.command("show")
@click.option("--bucket", help=_BUCKET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def queue_show(bucket: str | None, as_json: bool) -> None:
    """Show the bucket's Speeching queues and their NotifyConfig."""
    settings = Settings.from_env()
    try:
        chosen = choose_bucket(settings, bucket)
        queues = list_queues(ci_client(settings), chosen)
    except SubmitError as exc:
        raise click.ClickException(str(exc)) from None
    for view in queues:
        view = _masked(view, settings)
        if as_json:
            click.echo(json.dumps({"bucket": chosen} | view.to_dict()))
        else:
            echo_text(f"{view.queue_id}  {view.state:<7} {view.name}")
            echo_text(f"  notify: {view.notify_line()}{_here(view, settings)}")


@queue.command("register")
@click.option("--bucket", help=_BUCKET_HELP)
@click.option("--queue-id", help="The queue; default: the bucket's only Speeching queue.")
@click.option("--format", "result_format", type=_FORMAT, default="JSON", show_default=True, help="ResultFormat.")
@click.option("--tdmq", "tdmq_queue", metavar="QUEUE", help="Notify through this TDMQ queue (WEBHOOK_TDMQ_REGION).")
@click.option("--json", "as_json", is_flag=True, help="Print the queue as one JSON object.")
def queue_register(
    bucket: str | None, queue_id: str | None, result_format: str, tdmq_queue: str | None, as_json: bool
) -> None:
    """Make the queue call back here for every job on it.

    Sets its NotifyConfig to State On, Type Url, Event TaskFinish and Url
    WEBHOOK_PUBLIC_URL/callback/<token>, keeping the queue's name and state; with --tdmq QUEUE,
    Type TDMQ and MqName QUEUE (MqRegion WEBHOOK_TDMQ_REGION, MqMode Queue) for cos-webhook consume."""
    settings = Settings.from_env()
    try:
        mq = callback_queue(settings, tdmq_queue) if tdmq_queue else None
        url = "" if mq else callback_url(settings)
        chosen = choose_bucket(settings, bucket)
        before, after = register(ci_client(settings), chosen, url, result_format.upper(), queue_id, mq=mq)
    except SubmitError as exc:
        raise click.ClickException(str(exc)) from None
    before, after = _masked(before, settings), _masked(after, settings)
    if as_json:
        click.echo(json.dumps({"bucket": chosen} | after.to_dict()))
        return
    through = f" through TDMQ queue {tdmq_queue}" if tdmq_queue else ""
    echo_text(f"queue {after.queue_id} of {chosen} now calls back here{through}")
    echo_text(f"  notify: {after.notify_line()}")
    echo_text(f"  was:    {before.notify_line()}")


def _note(line: str) -> None:
    # Progress goes to stderr, so that stdout is the JobId alone: JOB=$(cos-webhook submit ...).
    click.echo(escape(line), err=True)


def _masked(view: QueueView, settings: Settings) -> QueueView:
    """``view`` with this service's callback tokens hidden in its Url: they are secrets."""
    url = view.notify.get("Url", "")
    for token in settings.callback_tokens:
        url = url.replace(token, "<WEBHOOK_CALLBACK_TOKEN>")
    if url == view.notify.get("Url", ""):
        return view
    return QueueView(view.queue_id, view.name, view.state, view.notify | {"Url": url})


def _here(view: QueueView, settings: Settings) -> str:
    notify = view.notify
    if notify.get("Type") == "TDMQ":
        ours = notify.get("MqName") in settings.tdmq_queues and notify.get("MqRegion") == settings.tdmq_region
        return "  (calls back here, through TDMQ)" if notify.get("State") == "On" and ours else ""
    try:
        mine = _masked(QueueView("", "", "", {"Url": callback_url(settings)}), settings).notify["Url"]
    except SubmitError:
        return ""
    on = view.notify.get("State") == "On" and view.notify.get("Url") == mine
    return "  (calls back here)" if on else ""
