"""One log format for every process: time, level, logger, then key=value facts."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str) -> None:
    """Configure the root logger unless the host (e.g. a test runner) already did."""
    root = logging.getLogger()
    if root.handlers:
        root.setLevel(level)
        return
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
