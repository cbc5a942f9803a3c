"""Retention: finished jobs past their time leave the ledger, nothing else does, and it stays bounded."""

from __future__ import annotations

import os
import pty
import re
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from support.processes import COS_WEBHOOK
from test_ledger import job

from webhook.cli import main
from webhook.intake.triage import triage
from webhook.ledger import Ledger, RawRequest, utcnow
from webhook.ledger.schema import attempts, callbacks, jobs, tasks, versions
from webhook.models import Callback, JobStatus
from webhook.worker.periodic import PeriodicPrune

TAGS = frozenset({"NoiseReduction"})
TABLES = (callbacks, jobs, versions, tasks, attempts)


def record(ledger: Ledger, n: int, body: bytes | None = None) -> str:
    """Job ``n`` from a callback of its own (a distinct body unless one is given)."""
    callback = Callback(event_name="TaskFinish", jobs=(job(n),), body_format="xml")
    raw = RawRequest(
        body=body or f"<Response>{n}</Response>".encode(),
        content_type="application/xml",
        headers={},
        remote_addr="127.0.0.1",
    )
    ledger.jobs.record(raw, callback, triage(callback, TAGS))
    return job(n).job_id


def age(ledger: Ledger, job_id: str, status: JobStatus, days: float) -> None:
    """Make the job ``status`` as of ``days`` ago, with an attempt in its timeline."""
    then = utcnow() - timedelta(days=days)
    with ledger.engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.job_id == job_id).values(status=status, updated_at=then))
        conn.execute(
            callbacks.update()
            .values(received_at=then)
            .where(callbacks.c.id == sa.select(jobs.c.callback_id).where(jobs.c.job_id == job_id).scalar_subquery())
        )
        conn.execute(
            attempts.insert().values(
                job_id=job_id,
                kind="verify",
                sink="",
                started_at=then,
                duration_ms=1,
                outcome="ok",
                code="",
                error="",
                worker_id="w",
            )
        )


def counts(ledger: Ledger) -> dict[str, int]:
    with ledger.engine.connect() as conn:
        return {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one() for t in TABLES}


def test_only_finished_jobs_past_retention_are_pruned_with_everything_they_own(ledger: Ledger) -> None:
    kept_statuses = {2: JobStatus.DEAD, 3: JobStatus.RECEIVED, 4: JobStatus.VERIFIED}
    old = {0: JobStatus.DELIVERED, 1: JobStatus.REJECTED, 5: JobStatus.IGNORED} | kept_statuses
    ids = {n: record(ledger, n) for n in range(7)}
    for n, status in old.items():
        age(ledger, ids[n], status, days=40)
    age(ledger, ids[6], JobStatus.DELIVERED, days=1)  # finished, but recent
    before = utcnow() - timedelta(days=30)

    foreseen = ledger.retention.would_prune(before)
    pruned = ledger.retention.prune(before)

    assert (pruned.jobs, pruned.callbacks) == (foreseen.jobs, foreseen.callbacks) == (3, 3)
    assert pruned.rows == foreseen.rows
    assert pruned.rows["attempts"] == 3
    left = {j.job_id for j in ledger.views.list_jobs(limit=100)}
    assert left == {ids[n] for n in (2, 3, 4, 6)}
    assert counts(ledger) == {"callbacks": 4, "jobs": 4, "job_versions": 4, "tasks": 4, "attempts": 4}
    assert ledger.retention.prune(before).jobs == 0  # nothing more to do


def test_a_repeated_body_keeps_its_metadata_but_is_stored_once(ledger: Ledger) -> None:
    body = b"<Response>" + b"x" * 10_000 + b"</Response>"
    record(ledger, 1, body)
    record(ledger, 1, body)  # CI sending it again
    with ledger.engine.connect() as conn:
        rows = conn.execute(sa.select(callbacks).order_by(callbacks.c.id)).all()
    assert [(len(r.body), r.size, r.body_of) for r in rows] == [
        (len(body), len(body), None),
        (0, len(body), rows[0].id),
    ]
    assert rows[0].sha256 == rows[1].sha256
    assert [r.body for r in ledger.views.raw_callbacks(job(1).job_id)] == [body]


def test_the_ledger_stays_bounded_over_fill_and_prune_cycles(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = Ledger(f"sqlite:///{path}")
    ledger.migrate()
    sizes = []
    for cycle in range(5):
        for n in range(150):
            job_id = record(ledger, cycle * 1000 + n, os.urandom(8_000))
            age(ledger, job_id, JobStatus.DELIVERED, days=40)
        assert counts(ledger)["jobs"] == 150
        ledger.retention.prune(utcnow() - timedelta(days=30), batch=40)
        assert set(counts(ledger).values()) == {0}
        sizes.append(sum(p.stat().st_size for p in tmp_path.glob("ledger.db*")))
    # Freed pages are reused: after the first cycle the files do not keep growing.
    assert max(sizes[1:]) <= sizes[0] * 1.25, sizes
    ledger.dispose()


def test_prune_from_the_command_line(ledger: Ledger) -> None:
    old = record(ledger, 1)
    age(ledger, old, JobStatus.DELIVERED, days=10)
    env = {"WEBHOOK_DATABASE_URL": ledger.url}

    dry = CliRunner().invoke(main, ["prune", "--older-than", "7d", "--dry-run"], env=env)
    assert dry.exit_code == 0, dry.output
    assert dry.output.startswith("would prune 1 jobs and 1 callbacks (with attempts 1, job_versions 1, tasks 1)")
    assert counts(ledger)["jobs"] == 1

    kept = CliRunner().invoke(main, ["prune"], env=env)  # default retention, 30 days: too young
    assert kept.output.startswith("pruned 0 jobs and 0 callbacks")
    done = CliRunner().invoke(main, ["prune", "--older-than", "7d"], env=env)
    assert done.output.startswith("pruned 1 jobs and 1 callbacks")
    # The cut-off is printed in UTC, marked so: 2026-12-07T04:05:06Z.
    assert re.search(r" \(before \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\)$", done.output.rstrip("\n")), done.output
    assert set(counts(ledger).values()) == {0}


def test_prune_reports_each_batch_as_it_goes(ledger: Ledger) -> None:
    for n in range(5):
        age(ledger, record(ledger, n), JobStatus.DELIVERED, days=10)
    so_far: list[tuple[int, int]] = []
    pruned = ledger.retention.prune(utcnow(), batch=2, progress=lambda p: so_far.append((p.jobs, p.callbacks)))
    assert so_far == [(2, 0), (4, 0), (5, 0), (5, 2), (5, 4), (5, 5)]
    assert (pruned.jobs, pruned.callbacks) == (5, 5)


@pytest.mark.slow  # a process on a pseudo-terminal
def test_prune_on_a_terminal_shows_progress_on_stderr_and_only_the_result_on_stdout(ledger: Ledger) -> None:
    for n in range(3):
        age(ledger, record(ledger, n), JobStatus.DELIVERED, days=10)
    terminal, its_end = pty.openpty()
    env = os.environ | {"WEBHOOK_DATABASE_URL": ledger.url}
    with os.fdopen(terminal, "rb", buffering=0) as screen:
        done = subprocess.run(
            [COS_WEBHOOK, "prune", "--older-than", "7d"], env=env, stdout=subprocess.PIPE, stderr=its_end, timeout=60
        )
        os.close(its_end)
        shown = _read_all(screen)
    assert done.returncode == 0
    assert done.stdout.decode().startswith("pruned 3 jobs and 3 callbacks")
    line = "pruning: 3 jobs and 0 callbacks (with attempts 3, job_versions 3, tasks 3) so far"
    assert shown.startswith(f"\r{line}".encode()), shown
    assert shown.endswith(b"\r" + b" " * len(line) + b"\r"), shown  # cleared for what follows


def _read_all(screen: BinaryIO) -> bytes:
    """What the command wrote to its terminal, until it closed it (EIO once no one holds the other end)."""
    chunks = []
    while True:
        try:
            chunk = screen.read(4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_workers_prune_one_at_a_time_each_interval(ledger: Ledger) -> None:
    age(ledger, record(ledger, 1), JobStatus.DELIVERED, days=40)
    clock = Clock()
    first, second = (PeriodicPrune(ledger, holder, 30, interval=60, clock=clock) for holder in ("a", "b"))

    assert first.tick() is not None
    assert second.tick() is None  # the lock is first's for the interval
    assert first.tick() is None  # not due again yet
    assert (first.runs, second.runs, first.last.jobs if first.last else None) == (1, 0, 1)
    clock.now = 61
    assert second.tick() is None  # first still holds it for this interval
    assert first.tick() is not None
