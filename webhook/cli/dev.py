"""Commands for development, with no cloud account: the local COS/CI sandbox and the demo.

The one module outside :mod:`webhook.dev` that imports it, and only when one of these commands
runs: the service itself never loads the sandbox.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from webhook.cli.base import main
from webhook.telemetry.logs import setup_logging


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=9000, show_default=True, type=int)
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), help="Where objects are kept.")
@click.option(
    "--no-results",
    is_flag=True,
    help="Jobs report no MediaResult or MediaInfo (so no MD5 for their output), as a CI that sends only "
    "Output.Object does.",
)
def sandbox(host: str, port: int, root: Path | None, no_results: bool) -> None:
    """Run the local COS/CI sandbox: develop without a cloud account."""
    from webhook.dev.sandbox import serve as serve_sandbox

    setup_logging("INFO", "auto")
    serve_sandbox(host, port, root, reports_results=not no_results)


@main.command()
@click.option("--format", "callback_format", type=click.Choice(["json", "xml"]), default="json", show_default=True)
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-output"))
@click.option("--seconds", default=5.0, show_default=True, help="Length of the generated noisy recording.")
def demo(callback_format: str, output: Path, seconds: float) -> None:
    """Run sandbox, receiver and worker; denoise a generated WAV end to end; print where it landed."""
    from webhook.dev.demo import run_demo

    setup_logging("WARNING", "auto")
    sys.exit(run_demo(callback_format, output, seconds))
