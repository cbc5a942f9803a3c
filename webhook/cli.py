"""The ``cos-webhook`` command line."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
import sqlalchemy
import sqlalchemy.engine
import sqlalchemy.exc

from webhook.config import Settings
from webhook.cos import make_client
from webhook.errors import ConfigError
from webhook.ledger import DeadLetter, JobView, Ledger, LedgerError, utcnow
from webhook.ledger.schema import metadata
from webhook.logs import escape, setup_logging
from webhook.sinks import DeliveryError
from webhook.sinks.config import SinkSpec, build_sinks
from webhook.verify import VerifyError, describe_job


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


def _ledger(settings: Settings) -> Ledger:
    ledger = Ledger(settings.database_url)
    ledger.create_schema()
    return ledger


Row = TypeVar("Row")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _since(_ctx: click.Context, _param: click.Parameter, value: str | None) -> datetime | None:
    """``2h``, ``30m``, ``3d`` ago, or an ISO date/time (UTC unless it names a zone)."""
    if value is None:
        return None
    text = value.strip()
    if text[:-1].isdigit() and text[-1:] in _UNITS:
        return utcnow() - timedelta(**{_UNITS[text[-1]]: int(text[:-1])})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither a duration like 2h or 3d nor an ISO date/time") from None
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when


class _Commands(click.Group):
    """Every command: a ledger that cannot be reached is one line naming it, exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except sqlalchemy.exc.SQLAlchemyError as exc:
            url = sqlalchemy.engine.make_url(Settings.from_env().database_url)
            where = url.render_as_string(hide_password=True)
            click.echo(f"Error: the ledger at {where} is unreachable ({type(exc).__name__})", err=True)
            ctx.exit(2)


@click.group(cls=_Commands)
@click.version_option(package_name="cos-webhook")
def main() -> None:
    """Receive, verify, fetch and forward Tencent Cloud Infinite noise-reduction results."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
def serve(host: str, port: int) -> None:
    """Run the callback receiver with the development server (production: gunicorn, see Procfile)."""
    from webhook.app import create_app

    settings = _settings()
    setup_logging(settings.log_level)
    try:
        app = create_app(settings)
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    app.run(host=host, port=port, threaded=True)


@main.command()
@click.option("--burst", is_flag=True, help="Exit once nothing is due instead of waiting for work.")
def worker(burst: bool) -> None:
    """Verify, fetch and deliver recorded jobs."""
    from webhook.worker import Worker

    settings = _settings()
    setup_logging(settings.log_level)
    try:
        w = Worker.from_settings(settings)
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    w.install_signal_handlers()
    try:
        w.run(burst=burst)
    finally:
        w.close()


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=9000, show_default=True, type=int)
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), help="Where objects are kept.")
def sandbox(host: str, port: int, root: Path | None) -> None:
    """Run the local COS/CI sandbox: develop without a cloud account."""
    from webhook.sandbox import serve as serve_sandbox

    setup_logging("INFO")
    serve_sandbox(host, port, root)


@main.command()
@click.option("--format", "callback_format", type=click.Choice(["json", "xml"]), default="json", show_default=True)
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-output"))
@click.option("--seconds", default=5.0, show_default=True, help="Length of the generated noisy recording.")
def demo(callback_format: str, output: Path, seconds: float) -> None:
    """Run sandbox, receiver and worker; denoise a generated WAV end to end; print where it landed."""
    from webhook.demo import run_demo

    setup_logging("WARNING")
    sys.exit(run_demo(callback_format, output, seconds))


@main.group()
def jobs() -> None:
    """Inspect jobs in the ledger."""


@jobs.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.option("--status", help="Only jobs with this status.")
@click.option("--limit", default=50, show_default=True)
def jobs_list(as_json: bool, status: str | None, limit: int) -> None:
    """List the most recent jobs."""
    _print_rows(
        _ledger(_settings()).views.list_jobs(limit=limit, status=status),
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
def jobs_show(job_id: str, as_json: bool) -> None:
    """Show one job, its verification and its deliveries."""
    try:
        view = _ledger(_settings()).views.show_job(job_id)
    except LedgerError as exc:
        raise click.ClickException(str(exc)) from None
    data = view.to_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key in ("job_id", "tag", "event_name", "state", "status", "reason", "created_at", "updated_at"):
        _echo_text(f"{key + ':':<12} {data[key]}")
    if view.job is None:
        _echo_text(f"{'detail:':<12} {view.unreadable}")
    elif (output := view.job.output) is not None:
        _echo_text(f"{'output:':<12} {output.bucket}/{output.key} ({output.region})")
    for version in data["callbacks"]:
        outcome = version["status"] + (f" ({version['reason']})" if version["reason"] else "")
        _echo_text(f"{'callback:':<12} #{version['callback_id']} at {version['received_at']}: {outcome}")
    for step in data["verify"]:
        _echo_text(f"{'verify:':<12} {_step(step)}")
    for delivery in data["deliveries"]:
        _echo_text(f"{'delivery:':<12} {delivery['sink']}: {_step(delivery)}")


@main.command()
@click.argument("job_id", required=False)
@click.option("--sink", "sinks", multiple=True, help="Only this sink (repeatable); default every sink that takes it.")
@click.option("--dead", is_flag=True, help="Replay every dead letter: verify again, or deliver again to its sink.")
@click.option("--rejected", is_flag=True, help="Verify every rejected job again.")
@click.option("--since", callback=_since, help="With --dead or --rejected: only those since then (2h, 3d, ISO time).")
def replay(job_id: str | None, sinks: tuple[str, ...], dead: bool, rejected: bool, since: datetime | None) -> None:
    """Give a job another chance: verify it again if it was rejected or its verification died,
    else deliver it again; or do so for every dead letter (--dead) or rejected job (--rejected)."""
    settings = _settings()
    specs = _specs(settings)
    unknown = [s for s in sinks if s not in specs]
    if unknown:
        raise click.ClickException(f"unknown sink {unknown[0]!r}; configured: {', '.join(specs) or 'none'}")
    if [bool(job_id), dead, rejected].count(True) != 1:
        raise click.UsageError("give a JOB_ID, --dead or --rejected")
    ledger = _ledger(settings)
    if job_id:
        try:
            job = ledger.views.show_job(job_id).job
            wanted = sinks or tuple(n for n, spec in specs.items() if job is not None and spec.accepts(job))
            replayed = ledger.jobs.replay(job_id, wanted)
        except LedgerError as exc:
            raise click.ClickException(str(exc)) from None
        if replayed.verify:
            click.echo(f"{job_id} will be verified again, then delivered to every sink that takes it")
        else:
            click.echo(f"replay of {job_id} scheduled for: {', '.join(replayed.sinks) or 'no sink'}")
        return
    if dead:
        letters = [d for d in ledger.views.dead_letters(since=since) if not sinks or d.sink in sinks]
        todo = [(letter.job_id, [letter.sink] if letter.sink else []) for letter in letters]
        what = "dead letters"
    else:
        todo = [(rejected_id, []) for rejected_id in ledger.views.rejected_jobs(since=since)]
        what = "rejected jobs"
    with click.progressbar(todo, label=f"replaying {what}", show_pos=True, file=sys.stderr) as bar:
        for replay_id, replay_sinks in bar:
            ledger.jobs.replay(replay_id, replay_sinks)
    click.echo(f"{len(todo)} {what} scheduled again")


@main.command()
@click.option("--since", default="24h", show_default=True, callback=_since, help="Jobs created since (2h, ISO time).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def reconcile(since: datetime, as_json: bool) -> None:
    """Find finished jobs whose callback never came (CI's job list) and record them for the worker."""
    from webhook.reconcile import ReconcileError
    from webhook.reconcile import reconcile as run_reconcile

    settings = _settings()
    try:
        settings.check_worker()
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    try:
        summary = run_reconcile(settings, _ledger(settings), since)
    except ReconcileError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
        return
    for bucket in summary.buckets:
        for job_id in bucket.recorded:
            _echo_text(f"recorded {job_id} ({bucket.bucket})")
    _echo_text(summary.line())


@main.group()
def dead() -> None:
    """Dead letters: verifications and deliveries that ran out of attempts or were refused for good."""


@dead.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.option("--sink", help="Only this sink's deliveries.")
@click.option("--since", callback=_since, help="Only those that died after this (2h, 3d, or ISO time).")
def dead_list(as_json: bool, sink: str | None, since: datetime | None) -> None:
    """List dead verifications and deliveries with their last error."""
    _print_rows(
        _ledger(_settings()).views.dead_letters(sink=sink, since=since),
        as_json,
        DeadLetter.to_dict,
        f"{'JOB ID':<36} {'KIND':<7} {'SINK':<16} {'ATTEMPTS':>8} {'DEAD SINCE':<20} LAST ERROR",
        lambda letter: (
            f"{letter.job_id:<36} {letter.kind:<7} {letter.sink or '-':<16} {letter.attempts:>8} "
            f"{letter.dead_at:%Y-%m-%d %H:%M:%S}  {letter.last_error}"
        ),
    )


@main.command()
def check() -> None:
    """Validate the configuration and try the ledger and every sink; one verdict per line."""
    settings = _settings()
    specs = _specs(settings)
    failures = 0
    verdicts = [_check_token(settings), _check_ledger(settings), *_check_ci(settings)]
    for verdict in verdicts:
        failures += verdict.startswith("FAIL")
        _echo_text(verdict)
    for name, spec in specs.items():
        try:
            sink = build_sinks([spec], settings.build_context())[name]
            verdict = sink.check()
            sink.close()
        except (ConfigError, DeliveryError) as exc:
            failures += 1
            click.echo(f"FAIL  {name} ({spec.type}): {exc}")
        else:
            click.echo(f"ok    {name} ({spec.type}): {verdict}")
    if not specs:
        failures += 1
        click.echo("FAIL  no sink is configured")
    if failures:
        raise SystemExit(1)


def _check_token(settings: Settings) -> str:
    try:
        settings.check_receiver()
    except ConfigError as exc:
        return f"FAIL  callback token: {exc}"
    return f"ok    callback token: {len(settings.callback_tokens)} configured"


def _check_ledger(settings: Settings) -> str:
    """Reachable, and every table there: read only, nothing is created."""
    ledger = Ledger(settings.database_url)
    try:
        missing = sorted(set(metadata.tables) - set(sqlalchemy.inspect(ledger.engine).get_table_names()))
    except sqlalchemy.exc.SQLAlchemyError as exc:
        return f"FAIL  ledger: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        ledger.dispose()
    kind = settings.database_url.split("://", 1)[0]
    if missing:
        return f"FAIL  ledger: {kind} is reachable but lacks tables {', '.join(missing)} (run cos-webhook init-db)"
    return f"ok    ledger: {kind} is reachable and has every table"


def _check_ci(settings: Settings) -> list[str]:
    """One cheap authenticated CI call per allowlisted bucket: are the credentials accepted?"""
    try:
        settings.check_worker()
    except ConfigError as exc:
        return [f"FAIL  worker settings: {exc}"]
    client = make_client(
        settings.secret_id, settings.secret_key, settings.region, settings.cos_endpoint, settings.cos_timeout
    )
    verdicts = []
    for bucket in sorted(settings.allowed_buckets):
        try:
            describe_job(client, bucket, "j" + "0" * 32)  # no such job: any answer but an error will do
        except VerifyError as exc:
            verdicts.append(f"FAIL  ci: {bucket} ({settings.region}): {exc}")
        else:
            verdicts.append(f"ok    ci: {bucket} ({settings.region}) accepts the credentials")
    return verdicts


@main.command("init-db")
def init_db() -> None:
    """Create the ledger's tables (also done on every start)."""
    settings = _settings()
    _ledger(settings)
    click.echo("ledger ready")


def _specs(settings: Settings) -> dict[str, SinkSpec]:
    return {spec.name: spec for spec in settings.sink_specs()}


def _print_rows(
    rows: Sequence[Row],
    as_json: bool,
    as_dict: Callable[[Row], dict[str, Any]],
    header: str,
    line: Callable[[Row], str],
) -> None:
    """JSON lines, or a table: the header, then one escaped line per row."""
    if as_json:
        for row in rows:
            click.echo(json.dumps(as_dict(row)))
        return
    click.echo(header)
    for row in rows:
        _echo_text(line(row))


def _summary(view: JobView) -> dict[str, Any]:
    data = view.to_dict()
    return {k: data[k] for k in ("job_id", "tag", "state", "status", "reason", "created_at", "updated_at")}


def _echo_text(line: str) -> None:
    # Ledger values come from callbacks and remote answers: with their control characters escaped
    # they cannot add a line, move the cursor or recolour the terminal (--json escapes them itself).
    click.echo(escape(line))


def _step(step: dict[str, Any]) -> str:
    text = f"{step['status']} attempts={step['attempts']}"
    if step["next_attempt_at"]:
        text += f" next={step['next_attempt_at']}"
    if step["last_error"]:
        text += f" last_error={step['last_error']}"
    return text
