"""Commands that check and prepare a deployment: check, init-db."""

from __future__ import annotations

import click
import sqlalchemy
import sqlalchemy.exc

from webhook.cli.base import echo_text, load_settings, main, open_ledger, sink_specs
from webhook.config import Settings
from webhook.cos import make_client
from webhook.errors import ConfigError
from webhook.ledger import Ledger
from webhook.ledger.schema import metadata
from webhook.sinks import DeliveryError
from webhook.sinks.config import build_sinks
from webhook.verify import VerifyError, describe_job


@main.command()
def check() -> None:
    """Validate the configuration and try the ledger and every sink; one verdict per line."""
    settings = load_settings()
    specs = sink_specs(settings)
    failures = 0
    verdicts = [_check_token(settings), _check_ledger(settings), *_check_ci(settings)]
    for verdict in verdicts:
        failures += verdict.startswith("FAIL")
        echo_text(verdict)
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
    settings = load_settings()
    open_ledger(settings)
    click.echo("ledger ready")
