"""gunicorn settings for a PaaS: everything that varies comes from the environment."""

import os
from typing import Any

from gunicorn.glogging import Logger

from webhook.telemetry import metrics_dir
from webhook.telemetry.logs import gunicorn_logconfig

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
# How long a silent worker process may go before the arbiter restarts it. With gthread workers
# this does NOT cut off a client that trickles its body slowly: that client keeps one thread for
# as long as it keeps sending (tests/test_hostile.py shows it). Slow-client protection belongs
# to the platform's router or a reverse proxy in front, which buffer request bodies.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = 30
keepalive = 5
# The app's records and gunicorn's own (boots, worker timeouts, tracebacks) in one format,
# WEBHOOK_LOG_FORMAT's, one record per line (see webhook/telemetry/logs.py). gunicorn's access log stays off:
# it would print the callback token from the URL; the app logs each request itself, redacted.
accesslog = None
errorlog = "-"
logconfig_dict = gunicorn_logconfig(os.environ.get("WEBHOOK_LOG_FORMAT", "auto"))
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")


class _NoAccessLog(Logger):  # type: ignore[misc]
    # A logconfig_dict is enough for gunicorn to build every request's access line, which the
    # config above then drops: building it cost each callback as much as logging one of our own.
    access_log_enabled = False


logger_class = _NoAccessLog


# Metrics: every web process counts into files in PROMETHEUS_MULTIPROC_DIR, and a scrape of any of
# them sums them all (webhook/telemetry/metrics_dir.py). The variable is set here, in the master, before it
# forks the processes that import the app (so this must not become preload_app).
def on_starting(server: object) -> None:
    metrics_dir.prepare()


def child_exit(server: object, worker: Any) -> None:
    metrics_dir.process_exited(worker.pid)


def on_exit(server: object) -> None:
    metrics_dir.remove_made()
