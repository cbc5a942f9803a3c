"""The Procfile's web command under gunicorn, configured only by environment variables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import requests
from support.logs import records
from support.pipeline import TOKEN, Pipeline, settings_env
from support.processes import wait_healthy, web

pytestmark = pytest.mark.slow  # gunicorn processes


def test_gunicorn_serves_callbacks_and_runs_the_worker_in_process(pipeline: Pipeline, tmp_path: Path) -> None:
    log = tmp_path / "web.log"
    env = settings_env(pipeline.settings) | {"WEBHOOK_RUN_WORKER": "true", "WEB_CONCURRENCY": "2"}
    with web(env, log) as (url, proc):
        wait_healthy(url, proc, log)
        job_id = pipeline.submit(pipeline.upload_input(), callback_url=f"{url}/callback/{TOKEN}")
        pipeline.wait_until(lambda: pipeline.status(job_id) == "delivered", timeout=60, what="in-process worker")
        metrics = requests.get(f"{url}/metrics", timeout=5).text
    assert 'cos_webhook_jobs{status="delivered"} 1.0' in metrics.splitlines()
    assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == pipeline.output_bytes()
    logged = log.read_text()
    lines = records(logged)  # gunicorn's own lines and the app's alike
    # Boots are quiet: alembic's set-up and context lines are below WARNING, so not written.
    assert [line for line in lines if re.search(r" (DEBUG|INFO) alembic[. ]", line)] == []
    assert "POST /callback/<token> 200" in logged
    assert TOKEN not in logged
    assert pipeline.settings.secret_key not in logged


def test_gunicorn_refuses_to_start_with_a_bad_setting(tmp_path: Path) -> None:
    log = tmp_path / "web.log"
    env = {"WEBHOOK_DATABASE_URL": f"sqlite:///{tmp_path / 'l.db'}", "WEBHOOK_CALLBACK_TOKEN": "short"}
    with web(env, log) as (_, proc):
        assert proc.wait(timeout=30) != 0
    logged = log.read_text()
    assert "WEBHOOK_CALLBACK_TOKEN must be 16 to 256 characters" in logged
    # gunicorn's error log keeps the worker's traceback on the line of its record.
    assert " ERROR gunicorn.error Exception in worker process\\nTraceback (most recent call last):\\n" in logged
