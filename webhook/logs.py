"""One log format for every process: time, level, logger, then key=value facts; one record, one line.

Log messages carry values from callbacks (chosen by whoever posts one) and from remote answers
(CI, COS, sinks). :class:`OneLineFormatter` writes every unprintable character of a rendered
record as its escape, so such a value can neither end the line and start a forged one nor send
escape sequences to the terminal that shows the log; the CLI prints ledger values through the
same :func:`escape`.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def escape(text: str) -> str:
    """``text`` with every character that is not printable written as its Python escape.

    That is control characters (``\\n``, ``\\r``, ``\\x1b``, ``\\x85``), line and paragraph
    separators (``\\u2028``), format characters such as bidi overrides (``\\u202e``) and lone
    surrogates; letters of any script stay as they are. Backslashes are left alone: a value
    holding a literal ``\\n`` reads the same as an escaped line break, but neither breaks the line.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class OneLineFormatter(logging.Formatter):
    """:data:`FORMAT`, with the whole rendered record escaped: message, traceback and stack included.

    A traceback stays on its record's line with its line breaks written as ``\\n``, so every line
    of a log is exactly one record and starts with this process's timestamp.
    """

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return escape(super().format(record))


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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter())
    logging.basicConfig(level=level, handlers=[handler])
