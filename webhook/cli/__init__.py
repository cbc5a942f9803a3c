"""The ``cos-webhook`` command line: one module per family of commands, all on :data:`main`."""

from webhook.cli import check, consume, dev, jobs, maintenance, processes, replay, submit, token
from webhook.cli.base import main

__all__ = ["check", "consume", "dev", "jobs", "main", "maintenance", "processes", "replay", "submit", "token"]
