"""The ``cos-webhook`` command line: one module per family of commands, all on :data:`main`."""

from webhook.cli import check, consume, jobs, processes, submit
from webhook.cli.base import main

__all__ = ["check", "consume", "jobs", "main", "processes", "submit"]
