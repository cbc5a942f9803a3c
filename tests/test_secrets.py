"""Secrets stay secret: a full round trip with distinctive values, then a search of everything written."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from support.pipeline import Pipeline, pipeline_settings, settings_env
from support.processes import start_worker, wait_healthy, web
from support.receiver import Receiver, Reply

from webhook.cli import main
from webhook.dev.sandbox import Sandbox
from webhook.ledger import Ledger
from webhook.ledger.schema import metadata

SECRET_ID = "AKIDdistinctSecretId4711"
SECRET_KEY = "SKEYdistinctSecretKey0815"
TOKEN = "tokenDistinctCallbackToken2342"
SINK_KEY = b"sinkDistinctSigningKey-1337-xyz"
SINK_SECRET = "whsec_" + base64.b64encode(SINK_KEY).decode()
SECRETS = (SECRET_KEY, TOKEN, SINK_SECRET, SINK_SECRET.removeprefix("whsec_"), SINK_KEY.decode())
DONE = {"delivered", "rejected", "dead"}


def everything_written(ledger: Ledger, texts: list[str], *dirs: Path) -> str:
    """Every row of every ledger table, every CLI output and every file under ``dirs``, as one text."""
    parts = list(texts)
    with ledger.engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in conn.execute(sa.select(table)):
                parts += [v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in row]
    for directory in dirs:
        parts += [p.read_bytes().decode("latin-1") for p in directory.rglob("*") if p.is_file()]
    return "\n".join(parts)


@pytest.mark.slow  # gunicorn and worker processes
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_is_written_anywhere(database_url: str, tmp_path: Path, log_format: str) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    # The receiver echoes what it can: even so the secret must not reach an error message.
    with (
        Sandbox(tmp_path / "sandbox", secret_id=SECRET_ID, secret_key=SECRET_KEY).start() as sandbox,
        Receiver(Reply(401, body=f"bad signature, expected {SINK_SECRET}".encode()), Reply(200)) as http,
    ):
        settings = pipeline_settings(database_url, sandbox, tmp_path / "delivered", http.url + "hooks").replace(
            callback_tokens=(TOKEN,),
            http_sink_secret=SINK_SECRET,
        )
        env = settings_env(settings) | {"WEBHOOK_LOG_LEVEL": "DEBUG", "WEBHOOK_LOG_FORMAT": log_format}
        ledger = Ledger(database_url)
        ledger.migrate()
        pipeline = Pipeline(settings, ledger, sandbox, "", http, tmp_path / "delivered")
        with web(env, logs / "web.log") as (url, proc):
            wait_healthy(url, proc, logs / "web.log")
            callback_url = f"{url}/callback/{TOKEN}"
            delivered = pipeline.submit(pipeline.upload_input(), callback_url=callback_url)
            pipeline.wait_until(lambda: pipeline.status(delivered) == "received", what="callback")
            worker = start_worker(env, logs / "worker.log", "--burst")
            assert worker.wait(timeout=60) == 0
            # The 401 killed the http delivery; replay it to see a success too.
            assert pipeline.status(delivered) == "dead"
            ledger.jobs.replay(delivered, ["http"])
            assert start_worker(env, logs / "worker.log", "--burst").wait(timeout=60) == 0
            assert pipeline.status(delivered) == "delivered"

        cli = CliRunner()
        outputs = [
            cli.invoke(main, args, env=env).output
            for args in (["jobs", "show", delivered, "--json"], ["jobs", "list"], ["dead", "list"], ["check"])
        ]

    written = everything_written(ledger, outputs, logs, tmp_path / "delivered")
    ledger.dispose()
    # Not vacuous: the logs and outputs really describe this job and its failed attempt.
    assert delivered in (logs / "worker.log").read_text()
    assert "POST /callback/<token> 200" in (logs / "web.log").read_text()
    assert "http: HTTP 401" in written
    assert "[redacted]" in written
    for secret in SECRETS:
        assert secret not in written, f"{secret!r} was written"
