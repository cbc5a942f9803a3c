"""Commands that check and prepare a deployment: check, migrate."""

from __future__ import annotations

import click
import requests

from webhook.ci.client import client_for
from webhook.ci.probes import NO_JOB, worker_permissions
from webhook.ci.verify import VerifyError, describe_job
from webhook.cli.base import echo_text, main, sink_specs
from webhook.config import Settings
from webhook.errors import ConfigError
from webhook.ledger import Ledger, LedgerError, LedgerUnavailable
from webhook.ledger.migrate import head as head_revision
from webhook.sinks import DeliveryError
from webhook.sinks.build import build_sinks, sink_context
from webhook.sinks.config import SinkSpec
from webhook.telemetry.logs import setup_logging

PUBLIC_URL_TIMEOUT = 5.0  # seconds for WEBHOOK_PUBLIC_URL/livez to answer


@main.command()
def check() -> None:
    """Validate the configuration and try the ledger and every sink; one verdict per line."""
    settings = Settings.from_env()
    specs = sink_specs(settings)
    failures = 0
    verdicts = [_check_token(settings), _check_ledger(settings), *_check_ci(settings), *_check_public_url(settings)]
    for verdict in verdicts:
        failures += verdict.startswith("FAIL")
        echo_text(verdict)
    for name, spec in specs.items():
        verdict = _check_sink(settings, name, spec)
        failures += verdict.startswith("FAIL")
        click.echo(verdict)
    if not specs:
        failures += 1
        click.echo("FAIL  no sink is configured")
    if failures:
        raise SystemExit(1)


def _check_sink(settings: Settings, name: str, spec: SinkSpec) -> str:
    """``ok``/``FAIL`` with the sink's target, so a failure says which URL, bucket or directory it was."""
    label = f"{name} ({spec.type})"
    try:
        sink = build_sinks([spec], sink_context(settings))[name]
    except (ConfigError, DeliveryError) as exc:  # no sink was built: there is no target to name
        return f"FAIL  {label}: {exc}"
    target = sink.target()
    label = f"{label} {target}" if target else label
    try:
        verdict = sink.check()
    except (ConfigError, DeliveryError) as exc:
        return f"FAIL  {label}: {exc}"
    finally:
        sink.close()
    return f"ok    {label}: {verdict}"


def _check_public_url(settings: Settings) -> list[str]:
    """Where CI is told to call back (``submit``, ``queue register``) must reach a running receiver."""
    if not settings.public_url:
        return []
    url = settings.public_url.rstrip("/") + "/livez"
    try:
        with requests.get(url, timeout=PUBLIC_URL_TIMEOUT, allow_redirects=False) as response:
            status = response.status_code
    except requests.RequestException as exc:
        return [f"FAIL  public url: {url}: {type(exc).__name__}: {str(exc)[:200]}"]
    if status != 200:
        return [f"FAIL  public url: {url} answered {status}, not 200"]
    return [f"ok    public url: {url} answered 200"]


def _check_token(settings: Settings) -> str:
    try:
        settings.check_receiver()
    except ConfigError as exc:
        return f"FAIL  callback token: {exc}"
    return f"ok    callback token: {len(settings.callback_tokens)} configured"


def _check_ledger(settings: Settings) -> str:
    """Reachable, and at this version's schema: read only, nothing is created (not even a SQLite file)."""
    kind = settings.database_url.split("://", 1)[0]
    try:
        ledger = Ledger(settings.database_url, read_only=True)
    except LedgerError as exc:
        return f"FAIL  ledger: {exc}"
    try:
        problem = ledger.schema_problem()
    except LedgerUnavailable as exc:
        return f"FAIL  ledger: {exc.kind}: {exc.detail}"
    finally:
        ledger.dispose()
    if problem:
        return f"FAIL  ledger: {kind} is reachable but {problem.removeprefix('the ledger ')}"
    return f"ok    ledger: {kind} is reachable and its schema is current ({head_revision()})"


def _check_ci(settings: Settings) -> list[str]:
    """One cheap authenticated CI call per allowlisted bucket: are the credentials accepted? Then one
    probe per call the worker makes on each of them: may the credentials make it?"""
    try:
        settings.check_worker()
    except ConfigError as exc:
        return [f"FAIL  worker settings: {exc}"]
    client = client_for(settings)
    verdicts = []
    for bucket in sorted(settings.allowed_buckets):
        try:
            describe_job(client, bucket, NO_JOB)  # no such job: any answer but an error will do
        except VerifyError as exc:
            verdicts.append(f"FAIL  ci: {bucket} ({settings.region}): {exc}")
        else:
            verdicts.append(f"ok    ci: {bucket} ({settings.region}) accepts the credentials")
    # Then which of the worker's calls they may make (README: "CAM policies"), one line each.
    for bucket in sorted(settings.allowed_buckets):
        verdicts.extend(permission.line() for permission in worker_permissions(client, bucket))
    return verdicts


@main.command()
def migrate() -> None:
    """Bring the ledger's schema to this version (the Procfile's release phase runs it)."""
    settings = Settings.from_env()
    setup_logging(settings.log_level, settings.log_format)  # says from which revision it migrated
    ledger = Ledger(settings.database_url)
    ledger.migrate()
    click.echo(f"ledger at revision {head_revision()}")


@main.command("init-db", hidden=True)
def init_db() -> None:
    """The former name of ``migrate``."""
    migrate.callback()  # type: ignore[misc]
