"""``cos-webhook token``: a fresh callback token."""

from __future__ import annotations

import secrets

import click

from webhook.cli.base import main

TOKEN_BYTES = 32  # 256 random bits: 43 URL-safe characters, within WEBHOOK_CALLBACK_TOKEN's 16 to 256


@main.command()
def token() -> None:
    """Print a new random callback token, for WEBHOOK_CALLBACK_TOKEN (keep it secret)."""
    click.echo(secrets.token_urlsafe(TOKEN_BYTES))
