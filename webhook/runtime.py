"""What a running app holds: its settings and ledger, reachable from request handlers."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask

from webhook.config import Settings
from webhook.ledger import Ledger

EXTENSION = "cos_webhook"


@dataclass
class Runtime:
    settings: Settings
    ledger: Ledger


def runtime(app: Flask) -> Runtime:
    rt: Runtime = app.extensions[EXTENSION]
    return rt
