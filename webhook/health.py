"""Health and metrics endpoints: ``GET /healthz`` and ``GET /metrics``, read from the ledger."""

from __future__ import annotations

import sqlalchemy.exc
from flask import Blueprint, Response, current_app, jsonify

from webhook.web import error, runtime

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    try:
        runtime(current_app).ledger.ping()
    except sqlalchemy.exc.SQLAlchemyError:
        return jsonify(status="unavailable", ledger="unreachable"), 503
    return jsonify(status="ok", ledger="ok"), 200


@bp.get("/metrics")
def metrics() -> tuple[Response, int]:
    """Prometheus text format, read from the ledger so every process reports the same."""
    try:
        counts = runtime(current_app).ledger.views.counts()
    except sqlalchemy.exc.SQLAlchemyError:
        return error(503, "ledger unavailable")
    lines = ["# TYPE cos_webhook_jobs gauge"]
    lines += [
        f'cos_webhook_jobs{{status="{key.removeprefix("jobs_")}"}} {value}'
        for key, value in sorted(counts.items())
        if key.startswith("jobs_")
    ]
    lines += ["# TYPE cos_webhook_tasks_pending gauge", f"cos_webhook_tasks_pending {counts['tasks_pending']}"]
    return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4"), 200
