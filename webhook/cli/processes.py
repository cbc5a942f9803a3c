"""Commands that run the service's processes: the receiver (serve) and the worker."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import click

from webhook.cli.base import main
from webhook.config import Settings
from webhook.telemetry import metrics_dir
from webhook.telemetry.logs import setup_logging

if TYPE_CHECKING:
    from webhook.web.server import BackgroundServer
    from webhook.worker.runtime import Worker


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
def serve(host: str, port: int) -> None:
    """Run the callback receiver with the development server (production: gunicorn, see Procfile)."""
    metrics_dir.count_in_process()  # one process: before prometheus-client is imported
    from webhook.web.launch import web_app

    web_app().run(host=host, port=port, threaded=True)


@main.command()
@click.option("--burst", is_flag=True, help="Exit once nothing is due instead of waiting for work.")
def worker(burst: bool) -> None:
    """Verify, fetch and deliver recorded jobs; serve /metrics on WEBHOOK_WORKER_METRICS_PORT if set."""
    metrics_dir.count_in_process()  # before prometheus-client is imported
    from webhook.telemetry import metrics
    from webhook.worker.runtime import Worker
    from webhook.worker.services import ServiceFailed

    settings = Settings.from_env()
    setup_logging(settings.log_level, settings.log_format)
    w = Worker.from_settings(settings)
    metrics.expect_sinks(w.sinks)
    w.install_signal_handlers()
    try:
        w.run(burst=burst, metrics_server=_metrics_server(settings, w))
    except ServiceFailed as exc:
        raise click.ClickException(f"the worker stopped: {exc}") from None
    finally:
        w.close()


class MetricsServer:
    """The worker's own /metrics (and probes) as one of its services: served until the worker stops."""

    name = "metrics server"

    def __init__(self, server: BackgroundServer) -> None:
        self.server = server

    def run(self, stopping: threading.Event) -> None:
        try:
            stopping.wait()
        finally:
            self.server.stop()


def _metrics_server(settings: Settings, w: Worker) -> MetricsServer | None:
    """On WEBHOOK_WORKER_METRICS_PORT, listening already: a port that is taken stops the command at once."""
    from webhook.web import health

    if (port := settings.worker_metrics_port) is None:
        return None
    try:
        server = health.metrics_server(settings, w.ledger, port).start()
    except OSError as exc:
        raise click.ClickException(f"WEBHOOK_WORKER_METRICS_PORT: cannot listen on port {port}: {exc}") from None
    logging.getLogger("webhook.worker").info("metrics on port %d: /metrics, /livez, /readyz", port)
    return MetricsServer(server)
