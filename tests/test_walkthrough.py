"""README's code, run as written: the local walk-through a newcomer pastes delivers a job, and the
register-the-URL script submits one whose callback comes here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.pipeline import DONE, Pipeline, settings_env

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Try it locally, step by step"


def walkthrough() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(HEADING) :]
    block = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert block is not None, f"no sh block under {HEADING!r}"
    return block.group(1)


@pytest.mark.slow  # four processes and a job end to end
def test_the_readme_walkthrough_delivers_a_job(tmp_path: Path) -> None:
    # Its own directory, with the test's virtualenv where the README's `make demo` would have made one.
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    done = subprocess.run(
        ["bash", "-e", "-c", walkthrough()], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    logs = "\n".join(f"== {log.name}\n{log.read_text()}" for log in sorted((tmp_path / "var").glob("*.log")))
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{logs}"
    assert done.stdout.startswith("ledger at revision "), done.stdout  # migrate's answer
    job_id = done.stdout.splitlines()[1]  # submit prints only the JobId on stdout
    assert re.fullmatch(r"j[0-9a-f]{32}", job_id), done.stdout
    assert f"job {job_id} delivered" in done.stderr
    assert re.search(rf"^{job_id} +NoiseReduction +Success +delivered ", done.stdout, re.MULTILINE), done.stdout
    delivered = tmp_path / "var" / "delivered"
    assert sorted(path.name for path in delivered.glob("j*")) == [f"{job_id}.event.json", f"{job_id}.wav"]
    assert (delivered / f"{job_id}.wav").read_bytes()[:4] == b"RIFF"


def register_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Register the URL with CI") :]
    block = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert block is not None, "no python block under the register heading"
    return block.group(1)


def test_the_register_snippet_submits_a_job_whose_callback_comes_here(pipeline: Pipeline) -> None:
    pipeline.upload_input("in/meeting.wav")
    env = os.environ | settings_env(pipeline.settings) | {"WEBHOOK_PUBLIC_URL": pipeline.receiver_url}
    done = subprocess.run(
        [sys.executable, "-c", register_snippet()], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert re.fullmatch(r"j[0-9a-f]{32}", job_id), done.stdout
    assert pipeline.drain(pipeline.worker(), job_id, DONE) == "delivered"
    assert (pipeline.sink_dir / f"{job_id}.wav").read_bytes() == pipeline.output_bytes("out/meeting.wav")
