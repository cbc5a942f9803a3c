"""gunicorn settings for a PaaS: everything that varies comes from the environment."""

import os

from gunicorn.glogging import Logger

from webhook.logs import OneLineFormatter

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
# Requests are logged by the app with the callback token redacted; gunicorn's access log
# would print the token from the URL.
accesslog = None
errorlog = "-"
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")


class OneLineLogger(Logger):
    """gunicorn's own error log (worker boots and timeouts, tracebacks, bad requests) in the app's
    format, one record per line like the app's logs (see webhook/logs.py)."""

    def setup(self, cfg: object) -> None:
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(OneLineFormatter())


logger_class = OneLineLogger
