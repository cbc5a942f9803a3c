"""One log format for every process: time, level, logger, then key=value facts."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str) -> None:
    """Configure the root logger unless the host (e.g. a test runner) already did."""
    # werkzeug's request log prints the callback URL, token included (the app logs requests
    # itself, redacted); the SDK logs every request URL and body at INFO.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logging.getLogger("qcloud_cos").setLevel(logging.WARNING)
    # pika logs every lost connection with a traceback; the sink reports it once, with context.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    root = logging.getLogger()
    if root.handlers:
        root.setLevel(level)
        return
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
