"""What every blueprint shares: the app's runtime (settings and ledger) and JSON error answers."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, Response, jsonify

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


def error(status: int, message: str) -> tuple[Response, int]:
    """``{"error": message, "status": status}``: every refusal names its problem."""
    return jsonify(error=message, status=status), status
