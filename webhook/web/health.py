"""Probes and metrics: ``GET /livez``, ``/readyz`` (``/healthz`` is its former name) and ``/metrics``.

``/livez`` only says the process answers. ``/readyz`` says whether it can do its work: the
ledger answers within :data:`READY_TIMEOUT` and its schema is current. ``/metrics`` is the
Prometheus exposition of :mod:`webhook.telemetry.metrics`, behind ``WEBHOOK_ALLOWED_SOURCES`` or
``WEBHOOK_METRICS_TOKEN`` when either is set. The worker serves the same blueprint on
``WEBHOOK_WORKER_METRICS_PORT`` (:func:`metrics_server`).
"""

from __future__ import annotations

import functools
import hmac
import threading
from dataclasses import dataclass

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from werkzeug.middleware.proxy_fix import ProxyFix

from webhook.config import Settings
from webhook.ledger import Ledger, Readiness
from webhook.telemetry import metrics
from webhook.web.common import EXTENSION, Runtime, error, in_networks, runtime
from webhook.web.server import BackgroundServer

bp = Blueprint("health", __name__)

UNLOGGED = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})  # the access log leaves them out
READY_TIMEOUT = 1.0  # seconds the ledger has to answer a readiness probe


@bp.get("/livez")
def livez() -> tuple[Response, int]:
    return jsonify(status="ok"), 200


@bp.get("/readyz")
@bp.get("/healthz")
def readyz() -> tuple[Response, int]:
    if (problem := _observed(current_app).readiness.problem()) is not None:
        return jsonify(status="unavailable", reason=problem), 503
    return jsonify(status="ok"), 200


@bp.get("/metrics")
def metrics_endpoint() -> tuple[Response, int]:
    if (refusal := _metrics_refusal(runtime(current_app).settings)) is not None:
        return error(403, refusal)
    body = _observed(current_app).exposition.text()
    return Response(body, content_type=metrics.CONTENT_TYPE), 200


METRICS_SET_HEADER = "X-Cos-Webhook-Metrics-Set"


def metrics_server(settings: Settings, ledger: Ledger, port: int, metrics_set: str) -> BackgroundServer:
    """A worker's ``/metrics`` (and probes) on ``port`` of every interface, with the web's access rules.

    Every answer names ``metrics_set`` (:data:`METRICS_SET_HEADER`): another worker finding the port
    taken asks ``/livez`` whether it is served for the same counts as its own.
    """
    app = Flask("webhook.worker_metrics")
    app.extensions[EXTENSION] = Runtime(settings=settings, ledger=ledger)
    app.register_blueprint(bp)

    @app.after_request
    def name_the_set(response: Response) -> Response:
        response.headers[METRICS_SET_HEADER] = metrics_set
        return response

    if settings.trusted_proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies)  # type: ignore[method-assign]
    # Every interface: Prometheus scrapes from another host. /metrics is guarded as on the web.
    return BackgroundServer(app, host="0.0.0.0", port=port, name="worker-metrics")  # noqa: S104


def _metrics_refusal(settings: Settings) -> str | None:
    """Why this request may not read the metrics, or None. With neither setting, anyone may."""
    sources, token = settings.allowed_sources, settings.metrics_token
    if not sources and not token:
        return None
    address = request.remote_addr or ""
    if sources and in_networks(address, sources):
        return None
    if token and _bearer_matches(request.headers.get("Authorization", ""), token):
        return None
    wanted = [f"a source address in WEBHOOK_ALLOWED_SOURCES ({address} is not)"] if sources else []
    wanted += ["Authorization: Bearer <WEBHOOK_METRICS_TOKEN>"] if token else []
    return "metrics need " + " or ".join(wanted)


def _bearer_matches(header: str, token: str) -> bool:
    scheme, _, given = header.partition(" ")
    # Compared whatever the scheme, so the time taken says nothing about the token.
    matched = hmac.compare_digest(given.strip().encode(), token.encode())
    return matched and scheme.lower() == "bearer"


# -- per-app state ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Observed:
    exposition: metrics.Exposition
    readiness: Readiness


_OBSERVED = "cos_webhook_observed"
_observed_lock = threading.Lock()


def _observed(app: Flask) -> _Observed:
    """The app's metrics registry and readiness probe, made on first use."""
    with _observed_lock:
        found: _Observed | None = app.extensions.get(_OBSERVED)
        if found is None:
            rt = runtime(app)
            read = functools.partial(rt.ledger.stats.snapshot, rt.settings.heartbeat_seconds)
            exposition = metrics.Exposition(metrics.registry(read), metrics.RENDER_CACHE_SECONDS)
            found = app.extensions[_OBSERVED] = _Observed(exposition, rt.ledger.readiness(READY_TIMEOUT))
        return found
