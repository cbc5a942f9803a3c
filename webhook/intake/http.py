"""The callback endpoint: authenticate, parse, commit to the ledger, then answer."""

from __future__ import annotations

import hmac
import logging
import time

from flask import Blueprint, Response, current_app, g, jsonify, request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from webhook.intake.callback import CallbackError, parse_callback
from webhook.intake.record import record_callback
from webhook.ledger import LedgerUnavailable, RawRequest
from webhook.telemetry import metrics
from webhook.web.common import LEDGER_RETRY_AFTER, error, runtime

log = logging.getLogger(__name__)
bp = Blueprint("receive", __name__)

# Kept for diagnosis; credentials and cookies never reach the ledger.
STORED_HEADERS = ("Content-Type", "Content-Length", "User-Agent", "X-Forwarded-For", "X-Real-Ip", "X-Request-Id")


@bp.before_app_request
def _arrived() -> None:
    # On the app, so that it runs before the checks that may answer first (source address).
    g.arrived = time.perf_counter()


@bp.after_request
def _count(response: Response) -> Response:
    """Every answer to a callback, refusals included, is counted and timed."""
    if request.method != "POST":  # Flask's automatic OPTIONS answer is not a callback
        return response
    arrived = g.get("arrived")
    elapsed = time.perf_counter() - arrived if arrived is not None else None
    metrics.callback_answered(response.status_code, g.get("callback_outcome"), elapsed)
    return response


@bp.post("/callback/<token>")
def callback(token: str) -> tuple[Response, int]:
    rt = runtime(current_app)
    if (used := _token_position(token, rt.settings.callback_tokens)) is None:
        return error(404, "unknown callback URL")
    # Which configured token (its position, never its value): during a rotation, whether the old one
    # is still in use shows in the access line.
    g.access_fields = {"token": used}
    body = request.get_data(cache=False)
    # A chunked body is cut off at the limit without an error; one more byte tells if it was.
    # That byte comes from the server's own (dechunked) stream: werkzeug's limited stream
    # raises 413 on any read past the limit, which refused a chunked body of exactly the limit
    # (and, under gunicorn, a Content-Length body of exactly the limit too). A body with a
    # Content-Length was bounded by it and has nothing more to read.
    if (
        len(body) >= rt.settings.max_body_bytes
        and request.content_length is None
        and request.environ["wsgi.input"].read(1)
    ):
        raise RequestEntityTooLarge()
    # gunicorn hands over a body cut short by a disconnecting client as if it were whole
    # (werkzeug's own server raises ClientDisconnected): refuse it the same way, with a 400.
    if request.content_length is not None and len(body) < request.content_length:
        raise ClientDisconnected()
    try:
        parsed = parse_callback(body)
    except CallbackError as exc:
        g.access_fields |= {"reason": exc.message}
        return error(exc.status, exc.message)
    raw = RawRequest(
        body=body,
        # werkzeug's development server passes a NUL through, and PostgreSQL text cannot hold one
        # (a 500); gunicorn refuses such a header itself.
        content_type=(request.content_type or "").replace("\x00", "\ufffd"),
        headers={name: request.headers[name] for name in STORED_HEADERS if name in request.headers},
        remote_addr=request.remote_addr or "",
    )
    try:
        recorded = record_callback(rt.ledger, raw, parsed, rt.settings.allowed_tags, rt.settings.max_versions_per_job)
    except LedgerUnavailable:
        # Whatever kept the ledger from committing (outage, full disk, a broken schema), the callback
        # is not stored: answer so that a sender that retries sends it again, never a bare 500.
        log.exception("ledger unavailable; callback not stored")
        response, status = error(503, "ledger unavailable, retry later")
        response.headers["Retry-After"] = LEDGER_RETRY_AFTER
        return response, status
    # Said by the request's one log line, the access line (webhook.web.app).
    g.access_fields |= {
        "callback_id": recorded.callback_id,
        "event": parsed.event_name,
        "body_format": parsed.body_format,
        "new": ",".join(recorded.job_ids) or "-",
        "duplicate": ",".join(recorded.duplicates) or "-",
        "ignored": ",".join(recorded.ignored) or "-",
    }
    g.callback_outcome = metrics.stored_outcome(recorded)
    jobs = [{"job_id": j, "duplicate": False} for j in recorded.job_ids]
    jobs += [{"job_id": j, "duplicate": True} for j in recorded.duplicates]
    return jsonify(
        event=parsed.event_name,
        jobs=jobs,
        duplicate=bool(recorded.duplicates) and not recorded.job_ids,
        ignored=list(recorded.ignored),
        capped=list(recorded.capped),
    ), 200


def _token_position(given: str, tokens: tuple[str, ...]) -> int | None:
    """Which of ``tokens`` (1 for the first) ``given`` is, or None."""
    # Compare against every token so timing does not reveal which one (if any) matched.
    found = None
    for position, token in enumerate(tokens, start=1):
        if hmac.compare_digest(given.encode(), token.encode()):
            found = position
    return found
