"""One log format for every process, as text or as JSON: one record, one line.

``text`` (the default on a terminal): time, level, logger, then the message. ``json`` (the
default when stderr is not a terminal, e.g. on a PaaS): one object per line with ``ts``,
``level``, ``logger`` and ``msg``. gunicorn's error log (:func:`gunicorn_logconfig`) and the COS
SDK's logger go through the same handler.

What a record is about is given to the log call as ``extra`` (:func:`fields`): ``job_id``,
``step``, ``sink`` and ``attempt``; every record written while a web request is served carries
its ``request_id`` (:func:`begin_request`). JSON has them as keys; text writes ``job=``, ``step=``
and ``sink=`` before the message, so a message says only what happened (``delivered attempt=1``).
A web request is one record, its access line; for a callback it also says how it was answered
(``callback_id``, ``event``, ``new``, ``duplicate``, ``ignored``, or why it was refused), which text
writes after the message.

A text line is read as space-separated ``key=value`` fields, so a field's value that holds a space,
an ``=`` or a quote is written quoted (:func:`quote`): ``reason="malformed XML: …"``; so is text put
into a message (a callback's user data in a rejection reason, an error's text) when it holds an
``=`` or a quote: ``rejected: "user data 'x job=j1' differs …"``. Neither can pass for a field of
its own, and plain values (ids, states, numbers) stay unquoted.

Log messages carry values from callbacks (chosen by whoever posts one) and from remote answers
(CI, COS, sinks). :class:`OneLineFormatter` writes every unprintable character of a rendered
record as its escape, so such a value can neither end the line and start a forged one nor send
escape sequences to the terminal that shows the log; the CLI prints ledger values through the
same :func:`escape`. JSON escapes them itself (and writes ASCII only).
"""

from __future__ import annotations

import logging
import re
import sys
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from pythonjsonlogger.json import JsonFormatter

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# The record attributes JSON writes first, under the names it gives them.
JSON_NAMES = {"asctime": "ts", "levelname": "level", "name": "logger", "message": "msg"}
# The fields text writes before the message, in this order: what the message is about.
TEXT_FIELDS = (("job_id", "job"), ("step", "step"), ("sink", "sink"))
# The fields text writes after the message, in this order: how a callback was answered (its access line).
TEXT_OUTCOME_FIELDS = (
    ("callback_id", "id"),
    ("event", "event"),
    ("body_format", "format"),
    ("new", "new"),
    ("duplicate", "duplicate"),
    ("ignored", "ignored"),
    ("reason", "reason"),
    ("token", "token"),
)

REQUEST_ID_HEADER = "X-Request-Id"
# An id a client or proxy sent is kept when it is an id (a UUID, a router's trace id), never text.
_VALID_REQUEST_ID = re.compile(r"[\w.:@/+=-]{1,128}", re.ASCII)
_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


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


# What makes a value read as more than one token of a text line, or as a quoted one.
_NEEDS_QUOTES = re.compile(r'[\s="\\]|^$')
# What makes text inside a message look like a field, or like the end of a quoted value.
_COULD_PLANT = re.compile(r'[="]')


def quote(value: object) -> str:
    """``value`` as one token of a text line: as it is when plain, else in double quotes with its
    backslashes and quotes escaped, so a reader splitting ``key=value`` fields cannot be misled."""
    text = str(value)
    if not _NEEDS_QUOTES.search(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _quoted_args(args: Any) -> Any:
    # Text in a message is quoted only when it could pass for a field (an =) or end a quoted value
    # (a quote): a message's words stay readable ("stopping (signal SIGTERM)"). Only text: numbers
    # stay numbers for %d, and a mapping's values keep their types.
    if not isinstance(args, tuple):
        return args
    return tuple(
        quote(arg) if isinstance(arg, str | BaseException) and _COULD_PLANT.search(str(arg)) else arg for arg in args
    )


class OneLineFormatter(logging.Formatter):
    """:data:`FORMAT`, with the whole rendered record escaped: message, traceback and stack included.

    The record's :data:`TEXT_FIELDS` come first in the message, as ``job=… sink=…``, and its
    :data:`TEXT_OUTCOME_FIELDS` last, as ``… new=… duplicate=…``. Those values, and text put into
    the message that holds an ``=`` or a quote, go through :func:`quote`. A traceback
    stays on its record's line with its line breaks written as ``\\n``, so every line of a log
    is exactly one record and starts with this process's timestamp.
    """

    def __init__(self) -> None:
        super().__init__(FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        about = "".join(
            f"{label}={quote(value)} "
            for key, label in TEXT_FIELDS
            if (value := getattr(record, key, None)) is not None
        )
        outcome = "".join(
            f" {label}={quote(value)}"
            for key, label in TEXT_OUTCOME_FIELDS
            if (value := getattr(record, key, None)) is not None
        )
        return FORMAT % (record.__dict__ | {"message": about + record.message + outcome})

    def format(self, record: logging.LogRecord) -> str:
        # Quoted on a copy: other handlers (a test's capture, JSON) see the record's own args.
        quoted = logging.makeLogRecord(record.__dict__ | {"args": _quoted_args(record.args), "message": None})
        return escape(super().format(quoted))


class JsonLineFormatter(JsonFormatter):
    """One JSON object per record: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, then the
    record's extra fields (``job_id``, ``request_id``, …) and ``exc_info`` for a traceback."""

    def __init__(self) -> None:
        super().__init__(FORMAT, rename_fields=JSON_NAMES, json_ensure_ascii=True)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def jsonify_log_record(self, log_data: dict[str, Any]) -> str:
        # ASCII-only JSON has escaped every other unprintable character; DEL is ASCII.
        return str(super().jsonify_log_record(log_data)).replace("\x7f", "\\u007f")


def resolve_format(log_format: str) -> Literal["json", "text"]:
    """``json`` or ``text`` as asked; ``auto`` (or anything else) is text on a terminal, else JSON."""
    if log_format == "json":
        return "json"
    if log_format == "text":
        return "text"
    return "text" if sys.stderr.isatty() else "json"


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for ``log_format`` (``auto``, ``json`` or ``text``)."""
    return JsonLineFormatter() if resolve_format(log_format) == "json" else OneLineFormatter()


class _AboutAJob(Protocol):
    @property
    def job_id(self) -> str: ...


def fields(about: _AboutAJob, *, step: bool = False) -> dict[str, Any]:
    """``extra=`` for a record about ``about`` (a job, or a ledger task or delivery).

    Its ``job_id``, and where ``about`` has them its ``sink`` and its ``attempts`` (as
    ``attempt``); with ``step``, also its ``kind`` as ``step``.
    """
    found: dict[str, Any] = {"job_id": about.job_id}
    if step and (kind := getattr(about, "kind", None)):
        found["step"] = str(kind)
    if sink := getattr(about, "sink", None):
        found["sink"] = sink
    if (attempt := getattr(about, "attempts", None)) is not None:
        found["attempt"] = attempt
    return found


def begin_request(incoming: str | None) -> str:
    """Start a web request's records: ``incoming`` as its ``request_id`` when it is a valid id,
    else a new one. Returns the id, which the response carries back (:data:`REQUEST_ID_HEADER`)."""
    request_id = incoming if incoming and _VALID_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
    _request_id.set(request_id)
    return request_id


def end_request() -> None:
    # Server threads serve one request after another: the next must not inherit this id.
    _request_id.set(None)


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every record written while a web request is served."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (request_id := _request_id.get()) is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


# Libraries' loggers held above INFO by every logging set-up (ours and gunicorn's), whatever
# WEBHOOK_LOG_LEVEL says. werkzeug's request log prints the callback URL, token included (the app
# logs requests itself, redacted); the SDK logs every request URL and body at INFO. pika logs every
# lost connection with a traceback; the sink reports it once, with context. alembic narrates its
# set-up when first imported (a "setup plugin" line per plugin, in every process that opens the
# ledger) and every migration context it opens; our own "migrated the ledger from revision … to …"
# (webhook.ledger.migrate) says what an operator needs.
QUIET = {"werkzeug": "WARNING", "qcloud_cos": "WARNING", "pika": "CRITICAL", "alembic": "WARNING"}


def setup_logging(level: str, log_format: str) -> None:
    """Configure the root logger unless the host (gunicorn, a test runner) already did."""
    for name, quiet in QUIET.items():
        logging.getLogger(name).setLevel(quiet)
    root = logging.getLogger()
    if root.handlers:
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=level, handlers=[handler])


def gunicorn_logconfig(log_format: str) -> dict[str, Any]:
    """gunicorn's ``logconfig_dict``: its error log and the root logger through one handler.

    gunicorn's access log stays silent: it would print the callback token from the URL. The app
    logs every request itself, the token replaced (``webhook.web.app``).
    """
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"line": {"()": formatter, "log_format": log_format}},
        "filters": {"request_id": {"()": RequestIdFilter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "line",
                "filters": ["request_id"],
            },
            "nowhere": {"class": "logging.NullHandler"},
        },
        "root": {"level": "INFO", "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"handlers": ["nowhere"], "propagate": False},
        }
        # In place before the app is imported, which imports alembic (and it speaks at once).
        | {name: {"level": quiet} for name, quiet in QUIET.items()},
    }
