"""Commands that run the service's processes: the receiver (serve) and the worker."""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import TYPE_CHECKING

import click
import requests

from webhook.cli.base import main
from webhook.config import Settings
from webhook.telemetry import metrics_dir
from webhook.telemetry.logs import setup_logging

if TYPE_CHECKING:
    from webhook.worker.runtime import Worker

log = logging.getLogger("webhook.worker")
RETRY_SECONDS = 5.0  # how often a worker not serving its metrics port tries it again


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
    settings = Settings.from_env()
    metrics_set = _count_metrics(settings)  # before prometheus-client is imported
    from webhook.telemetry import metrics
    from webhook.worker.runtime import Worker
    from webhook.worker.services import ServiceFailed

    setup_logging(settings.log_level, settings.log_format)
    w = Worker.from_settings(settings)
    metrics.expect_sinks(w.sinks)
    w.install_signal_handlers()
    port = settings.worker_metrics_port
    server = MetricsServer(settings, w, port, metrics_set) if port is not None else None
    try:
        w.run(burst=burst, metrics_server=server)
    except ServiceFailed as exc:
        raise click.ClickException(f"the worker stopped: {exc}") from None
    finally:
        w.close()


def _count_metrics(settings: Settings) -> str:
    """Where this worker counts: in memory without a metrics port, else in the files every worker of
    this host shares for that port. Returns what names those files to the others ("" for none)."""
    if (port := settings.worker_metrics_port) is None:
        metrics_dir.count_in_process()
        return ""
    directory = metrics_dir.shared_by_workers(port, settings.worker_metrics_dir)
    return hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]


class MetricsServer:
    """The worker's /metrics (and probes) as one of its services, on WEBHOOK_WORKER_METRICS_PORT.

    Every worker of a host given the same port counts into the same files, and the one that holds
    the port serves the sum of all of them. The others try the port again every
    :data:`RETRY_SECONDS`, so when the one serving stops another takes over. A port held by any
    other program is one log record naming the variable; the worker goes on without serving.
    """

    name = "metrics server"

    def __init__(self, settings: Settings, w: Worker, port: int, metrics_set: str) -> None:
        from webhook.web import health

        self.port = port
        self.metrics_set = metrics_set
        self.server = health.metrics_server(settings, w.ledger, port, metrics_set)

    def run(self, stopping: threading.Event) -> None:
        told = False  # the port's holder was logged
        while not stopping.is_set():
            try:
                self.server.start()
            except OSError as exc:
                if not told:
                    self._report_holder(exc)
                    told = True
                stopping.wait(RETRY_SECONDS)
                continue
            log.info("metrics on port %d: /metrics, /livez, /readyz (every worker of this host counted)", self.port)
            try:
                stopping.wait()
            finally:
                self.server.stop()

    def _report_holder(self, exc: OSError) -> None:
        from webhook.web.health import METRICS_SET_HEADER

        try:
            answer = requests.get(f"http://127.0.0.1:{self.port}/livez", timeout=2)
            holder = answer.headers.get(METRICS_SET_HEADER, "")
        except requests.RequestException:
            holder = ""
        if holder == self.metrics_set:
            log.info(
                "metrics on port %d are served by another worker of this host, this one's counts included", self.port
            )
        else:
            log.error(
                "WEBHOOK_WORKER_METRICS_PORT=%d is taken by another program (%s): this worker's metrics are "
                "counted but not served until the port is free",
                self.port,
                exc.strerror or exc,
            )
