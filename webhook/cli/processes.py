"""Commands that run the service's processes: receiver, worker, sandbox and the demo."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from webhook.cli.base import load_settings, main
from webhook.errors import ConfigError
from webhook.logs import setup_logging


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
def serve(host: str, port: int) -> None:
    """Run the callback receiver with the development server (production: gunicorn, see Procfile)."""
    from webhook.app import create_app

    settings = load_settings()
    setup_logging(settings.log_level)
    try:
        app = create_app(settings)
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    app.run(host=host, port=port, threaded=True)


@main.command()
@click.option("--burst", is_flag=True, help="Exit once nothing is due instead of waiting for work.")
def worker(burst: bool) -> None:
    """Verify, fetch and deliver recorded jobs."""
    from webhook.worker import Worker

    settings = load_settings()
    setup_logging(settings.log_level)
    try:
        w = Worker.from_settings(settings)
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    w.install_signal_handlers()
    try:
        w.run(burst=burst)
    finally:
        w.close()


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=9000, show_default=True, type=int)
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), help="Where objects are kept.")
def sandbox(host: str, port: int, root: Path | None) -> None:
    """Run the local COS/CI sandbox: develop without a cloud account."""
    from webhook.sandbox import serve as serve_sandbox

    setup_logging("INFO")
    serve_sandbox(host, port, root)


@main.command()
@click.option("--format", "callback_format", type=click.Choice(["json", "xml"]), default="json", show_default=True)
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-output"))
@click.option("--seconds", default=5.0, show_default=True, help="Length of the generated noisy recording.")
def demo(callback_format: str, output: Path, seconds: float) -> None:
    """Run sandbox, receiver and worker; denoise a generated WAV end to end; print where it landed."""
    from webhook.demo import run_demo

    setup_logging("WARNING")
    sys.exit(run_demo(callback_format, output, seconds))
