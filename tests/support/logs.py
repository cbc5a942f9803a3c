"""Reading logs as the service writes them: one record per line, as text or as JSON."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from webhook.telemetry.logs import setup_logging

# What webhook.telemetry.logs.FORMAT renders at the start of every record: "2026-01-31 12:00:00,123 INFO webhook.x ".
RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+ ")


def records(text: str) -> list[str]:
    """The lines of ``text``, after checking that each one is a whole record and nothing else is."""
    lines = text.split("\n")
    assert lines.pop() == "", "the log does not end with a line break"
    for line in lines:
        assert RECORD.match(line), f"not a record of its own: {line!r}"
        assert line.isprintable(), f"raw control character in: {line!r}"
    return lines


def json_records(text: str) -> list[dict[str, Any]]:
    """The records of a JSON log, after checking that each line is one object with the basic keys."""
    lines = text.split("\n")
    assert lines.pop() == "", "the log does not end with a line break"
    found = []
    for line in lines:
        assert line.isprintable(), f"raw control character in: {line!r}"
        assert line.isascii(), f"raw non-ASCII character in: {line!r}"
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert list(record)[:4] == ["ts", "level", "logger", "msg"], line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"]), line
        assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), line
        found.append(record)
    return found


@contextmanager
def root_log(level: str = "INFO", log_format: str = "text") -> Iterator[io.StringIO]:
    """What the handler ``setup_logging`` installs writes while the block runs, as a string buffer.

    The test runner's own handlers are set aside meanwhile, so ``setup_logging`` configures the
    root logger exactly as it does in a fresh process (web, worker or CLI).
    """
    root = logging.getLogger()
    saved, saved_level = root.handlers[:], root.level
    root.handlers.clear()
    try:
        setup_logging(level, log_format)
        (handler,) = root.handlers
        assert isinstance(handler, logging.StreamHandler)
        buffer = io.StringIO()
        handler.setStream(buffer)
        yield buffer
    finally:
        root.handlers[:] = saved
        root.setLevel(saved_level)
