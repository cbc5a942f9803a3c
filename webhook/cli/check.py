"""Commands that check and prepare a deployment: check, migrate."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import click
import sqlalchemy
import sqlalchemy.engine
import sqlalchemy.exc
import sqlalchemy.pool

from webhook.ci.client import client_for
from webhook.ci.verify import VerifyError, describe_job
from webhook.cli.base import echo_text, main, sink_specs
from webhook.config import Settings
from webhook.errors import ConfigError
from webhook.ledger import Ledger
from webhook.ledger.engine import make_engine
from webhook.ledger.migrate import head as head_revision
from webhook.ledger.migrate import problem as schema_problem
from webhook.sinks import DeliveryError
from webhook.sinks.build import build_sinks, sink_context


@main.command()
def check() -> None:
    """Validate the configuration and try the ledger and every sink; one verdict per line."""
    settings = Settings.from_env()
    specs = sink_specs(settings)
    failures = 0
    verdicts = [_check_token(settings), _check_ledger(settings), *_check_ci(settings)]
    for verdict in verdicts:
        failures += verdict.startswith("FAIL")
        echo_text(verdict)
    for name, spec in specs.items():
        try:
            sink = build_sinks([spec], sink_context(settings))[name]
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
    """Reachable, and at this version's schema: read only, nothing is created (not even a SQLite file)."""
    kind = settings.database_url.split("://", 1)[0]
    url = sqlalchemy.engine.make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        path = Path(url.database).absolute()
        if not path.exists():
            return f"FAIL  ledger: {kind} database {path} does not exist (run cos-webhook migrate)"
        engine = _read_only_sqlite(path)
    else:
        engine = make_engine(settings.database_url)
    try:
        problem = schema_problem(engine)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        return f"FAIL  ledger: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    finally:
        engine.dispose()
    if problem:
        return f"FAIL  ledger: {kind} is reachable but {problem.removeprefix('the ledger ')}"
    return f"ok    ledger: {kind} is reachable and its schema is current ({head_revision()})"


def _read_only_sqlite(path: Path) -> sqlalchemy.engine.Engine:
    """An engine that reads the SQLite file at ``path`` and can create nothing beside it.

    ``mode=ro`` alone is not enough for the ledger's WAL database: when no process has it open
    (no ``-wal`` or ``-shm`` file), a read-only connection creates both and, unable to
    checkpoint, leaves them behind. Then every committed page is in the main file, so it is read
    as immutable, which takes no locks and touches no other file. A database some process has
    open (or left open when it was killed) is read through its WAL as usual.
    """
    in_use = any(path.with_name(path.name + suffix).exists() for suffix in ("-wal", "-shm"))
    uri = f"{path.as_uri()}?mode=ro" + ("" if in_use else "&immutable=1")
    return sqlalchemy.create_engine(
        "sqlite://", creator=lambda: sqlite3.connect(uri, uri=True, timeout=10), poolclass=sqlalchemy.pool.NullPool
    )


def _check_ci(settings: Settings) -> list[str]:
    """One cheap authenticated CI call per allowlisted bucket: are the credentials accepted?"""
    try:
        settings.check_worker()
    except ConfigError as exc:
        return [f"FAIL  worker settings: {exc}"]
    client = client_for(settings)
    verdicts = []
    for bucket in sorted(settings.allowed_buckets):
        try:
            describe_job(client, bucket, "j" + "0" * 32)  # no such job: any answer but an error will do
        except VerifyError as exc:
            verdicts.append(f"FAIL  ci: {bucket} ({settings.region}): {exc}")
        else:
            verdicts.append(f"ok    ci: {bucket} ({settings.region}) accepts the credentials")
    return verdicts


@main.command()
def migrate() -> None:
    """Bring the ledger's schema to this version (the Procfile's release phase runs it)."""
    ledger = Ledger(Settings.from_env().database_url)
    ledger.migrate()
    click.echo(f"ledger at revision {head_revision()}")


@main.command("init-db", hidden=True)
def init_db() -> None:
    """The former name of ``migrate``."""
    migrate.callback()  # type: ignore[misc]
