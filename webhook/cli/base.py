"""The ``cos-webhook`` command group and what its commands share."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import click

from webhook.config import Settings
from webhook.errors import ConfigError
from webhook.ledger import Ledger, LedgerError, LedgerUnavailable, utcnow
from webhook.sinks.config import SinkSpec
from webhook.telemetry.logs import escape


def open_ledger(settings: Settings) -> Ledger:
    """The ledger, if its schema is current; commands never change the schema (``migrate`` does)."""
    ledger = Ledger(settings.database_url)
    ledger.require_current_schema()
    return ledger


Row = TypeVar("Row")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(_ctx: click.Context, _param: click.Parameter, value: str | None) -> datetime | None:
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
    """Every command: a configuration problem or a ledger refusal (unknown job, schema behind) is
    one ``Error:`` line, exit status 1; a ledger that cannot be reached is one line naming it,
    exit status 2. No traceback either way."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise click.ClickException(f"configuration error: {exc}") from None
        except LedgerUnavailable as exc:
            click.echo(f"Error: the ledger at {exc.where} is unreachable ({exc.kind})", err=True)
            ctx.exit(2)
        except LedgerError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Commands)
@click.version_option(package_name="cos-webhook")
def main() -> None:
    """Receive, verify, fetch and forward Tencent Cloud Infinite noise-reduction results."""


def sink_specs(settings: Settings) -> dict[str, SinkSpec]:
    return {spec.name: spec for spec in settings.sink_specs()}


def print_rows(
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
        echo_text(line(row))


def echo_text(line: str) -> None:
    # Ledger values come from callbacks and remote answers: with their control characters escaped
    # they cannot add a line, move the cursor or recolour the terminal (--json escapes them itself).
    click.echo(escape(line))
