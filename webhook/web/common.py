"""What the app's blueprints share (receive, health, dashboard): the settings and ledger the app was
built with (:func:`runtime`), source address checks and JSON error answers.

The app itself is built in :mod:`webhook.web.app`; a web process starts in :mod:`webhook.web.launch`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from flask import Flask, Response, jsonify

from webhook.config import Settings
from webhook.ledger import Ledger

EXTENSION = "cos_webhook"
# How long a client is asked to wait (Retry-After, seconds) when the ledger is unavailable: an
# outage or a failover is not over at once, and every retry sooner would meet it again.
LEDGER_RETRY_AFTER = "30"


@dataclass
class Runtime:
    settings: Settings
    ledger: Ledger


def runtime(app: Flask) -> Runtime:
    rt: Runtime = app.extensions[EXTENSION]
    return rt


def in_networks(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    """Whether ``address`` (a client's, after any trusted proxies) is in one of ``networks``."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def error(status: int, message: str) -> tuple[Response, int]:
    """``{"error": message, "status": status}``: every refusal names its problem."""
    return jsonify(error=message, status=status), status
