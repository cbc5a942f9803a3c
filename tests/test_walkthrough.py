"""README's local walk-through, run as written: a newcomer pasting it gets a delivered job."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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
