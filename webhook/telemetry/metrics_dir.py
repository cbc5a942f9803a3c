"""Where gunicorn's web processes keep their counters, so that a scrape of any of them sums them all.

prometheus-client decides when it is first imported whether a process counts in memory or in
files under ``PROMETHEUS_MULTIPROC_DIR``. gunicorn's master therefore prepares the directory
and sets the variable before it forks the processes that import the app (gunicorn.conf.py);
nothing here imports prometheus-client at module level, so the master can use it first.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

_made: list[Path] = []  # directories prepare() created, removed by remove_made()


def prepare() -> Path:
    """In gunicorn's master at start: the operator's directory emptied of a previous run's files
    (created if missing), or, when the variable is not set, a new temporary one it then names."""
    given = os.environ.get(VARIABLE, "")
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        # Files of processes from an earlier run would be summed with this run's forever.
        for stale in path.glob("*.db"):
            stale.unlink(missing_ok=True)
        return path
    path = Path(tempfile.mkdtemp(prefix="cos-webhook-metrics-"))
    os.environ[VARIABLE] = str(path)
    _made.append(path)
    return path


def process_exited(pid: int) -> None:
    """A web process is gone: drop its share of gauges that only count live processes."""
    from prometheus_client import multiprocess

    if os.environ.get(VARIABLE):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def remove_made() -> None:
    """At the master's exit: remove the temporary directory :func:`prepare` made, if it made one."""
    while _made:
        shutil.rmtree(_made.pop(), ignore_errors=True)


def shared_by_workers(port: int, directory: str = "") -> Path:
    """A worker with a metrics port counts in files shared by every worker of this host on that port.

    Whichever of them holds the port serves the sum of all of them, so a Procfile scaled to several
    workers gives every one the same ``WEBHOOK_WORKER_METRICS_PORT``. Nothing empties the directory:
    counters only grow, and the files of a worker that exited keep its counts in the sum (restarting
    one never makes a total go down).
    """
    path = Path(directory) if directory else Path(tempfile.gettempdir()) / f"cos-webhook-worker-metrics-{port}"
    path.mkdir(parents=True, exist_ok=True)
    os.environ[VARIABLE] = str(path)
    return path


def count_in_process() -> None:
    """A process that serves no metrics port counts only in its own memory.

    A directory meant for gunicorn's processes (and emptied by its master at each start) must not
    be shared with it, and may not even exist where it runs.
    """
    os.environ.pop(VARIABLE, None)
