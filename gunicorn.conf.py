"""gunicorn settings for a PaaS: everything that varies comes from the environment."""

import os

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
# A callback body is at most WEBHOOK_MAX_BODY_BYTES; a client that cannot send it in this
# long is cut off so slow senders cannot hold every thread.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = 30
keepalive = 5
# Requests are logged by the app with the callback token redacted; gunicorn's access log
# would print the token from the URL.
accesslog = None
errorlog = "-"
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
