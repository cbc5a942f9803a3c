"""The chaos run: many real callbacks through the real processes while things break, and nothing is lost.

    .venv/bin/pytest tests/chaos -q -s                         # CI size: 200 callbacks, 10 s CI outage
    CHAOS_CALLBACKS=2000 .venv/bin/pytest tests/chaos -q -s    # the full run, 60 s CI outage

What runs, once on each ledger (a SQLite file, a private PostgreSQL schema): the Procfile's
gunicorn with two web processes, two ``cos-webhook worker`` processes with ``WORKER_CONCURRENCY``
claims in flight each, the sandbox running every NoiseReduction job
and POSTing its callback as CI's own examples show them (the buckets left empty, so each job is
found among the allowlist; every third job's output a ``${InputName}.${ext}`` template, fetched
where ``MediaResult`` says CI wrote it and checked against its MD5), and two sinks: a directory
and an http receiver that refuses 30% of requests with 503 and trickles its answer to 10% (a
``200 OK`` status line, then a header one
byte a second that never ends). The workers' http sink deadline is 2 s: a trickled delivery
must be abandoned and retried, and the receiver counts it as not accepted. A third sink,
``stuck``, is an http receiver that accepts every connection, reads the request and never
answers: its deliveries hold only its own slots (bulkheads) and its breaker pauses it.

What breaks: a random worker is SIGKILLed about every 2 s and replaced at once (its successor
finds the killed pid gone and releases its leases when it starts; else they come back when
the 3 s lease runs out); gunicorn is stopped once halfway through the callbacks and stays down
longer than the sandbox retries, so some callbacks fail for good and are POSTed again by the
test, as CI would; 10% of delivered callbacks arrive a second time; once a third of the
callbacks are out, CI's DescribeMediaJob answers 503 for ``CHAOS_CI_OUTAGE`` seconds (60 for
2000 callbacks or more, 10 for 200), and the workers retry those verifications on their own
(backoff capped at 10 s).

What must hold at the end: every job is ``verified`` with every task ``done`` but its delivery to
the hanging sink, which is still pending (retrying or paused), none done or dead; the directory has
exactly ``<job_id>.wav`` and ``<job_id>.event.json`` per job and nothing else; every file, on
disk and in every accepted http request, is byte-identical to the sandbox's output object; every
job's ``webhook-id`` was accepted (a whole 200 reached the worker); both new injections happened,
and no trickle outlasted the workers' patience. A webhook-id accepted more than once is not a
loss (the receiver is idempotent by it) but is counted. A table of what was injected and what
survived is printed (``-s`` shows it) and saved as JSON in the test's ``tmp_path``.
``CHAOS_DEADLINE`` (seconds) overrides the time guard and ``CHAOS_SEED`` the randomness.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import statistics
import struct
import threading
import time
import wave
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from chaos_harness import Background, CallbackPump, CiOutage, WebServer, WorkerFleet, kill_workers_now_and_then
from chaos_sink import Attempt, FlakySink
from qcloud_cos import CosS3Client
from support.pipeline import BUCKET, HTTP_KEY, REGION, TOKEN, pipeline_settings, settings_env
from support.services import postgres_schema
from support.trickle import Trickle

from webhook.ci.crc64 import crc64ecma
from webhook.ci.submit import submit_noise_reduction
from webhook.config import Settings
from webhook.dev.sandbox import CallbackShape, Sandbox, noisy_wav
from webhook.ledger import Ledger
from webhook.ledger.schema import attempts as attempt_rows
from webhook.ledger.schema import jobs, tasks
from webhook.models import ObjectLocation, Step
from webhook.models import Outcome as AttemptOutcome
from webhook.retry import RetryPolicy
from webhook.sinks.events import event_id
from webhook.sinks.filesystem import PARTIAL_DIR

pytestmark = pytest.mark.slow  # minutes of real processes being killed

CALLBACKS = int(os.environ.get("CHAOS_CALLBACKS", "200"))
# How long CI's DescribeMediaJob answers 503: a minute at full size, scaled down with the run.
CI_OUTAGE = float(os.environ.get("CHAOS_CI_OUTAGE", min(60.0, max(10.0, 0.03 * CALLBACKS))))
# A guard against a hung run, not a measurement: trickled answers hold a worker for the whole
# http deadline each, so about 3 minutes for 200 callbacks on 2 cores, 18 for 2000.
DEADLINE = float(os.environ.get("CHAOS_DEADLINE", max(180.0, 0.5 * CALLBACKS) + CI_OUTAGE))
SEED = int(os.environ.get("CHAOS_SEED", "20240501"))

HTTP_FAILURE_RATE = 0.3
HTTP_TRICKLE_RATE = 0.1
HTTP_SINK_TIMEOUT = 2.0  # the workers' deadline for one whole http exchange
# A trickle the worker has not hung up on by then means its deadline did not cut it off.
TRICKLE_LIMIT = 10 * HTTP_SINK_TIMEOUT
DUPLICATE_SHARE = 0.1
WORKER_CONCURRENCY = 4  # claims in flight per worker: a SIGKILL cuts several deliveries at once
LEASE_SECONDS = 3  # a killed worker's claim is due again this soon, if its successor has not freed it
KILL_EVERY = (1.5, 2.5)  # seconds between SIGKILLs, drawn uniformly: "about every 2 s"
WEB_DOWN_SECONDS = 3.0  # longer than the sandbox's own callback retries (0.2 + 0.5 + 1.0 s)
SUBMIT_THREADS = 4
INPUT_SECONDS = 0.1  # tiny inputs: the run exercises delivery, not denoising
# Fast retries, and enough of them that a 40% failure rate (503s and trickles) never exhausts a
# delivery (0.4^50).
RETRY = RetryPolicy(max_attempts=50, backoff_base=0.2, backoff_cap=2.0)
# Verification keeps its default patience (1000 attempts, a day) but waits at most this long
# between checks, so jobs caught by the CI outage are verified within seconds of its end.
VERIFY_BACKOFF_CAP = 10.0
CI_UNAVAILABLE = "CI answered 503"  # how a verification refused by the outage is recorded
FILESYSTEM, HTTP = "filesystem", "http"
CORRUPT = "corrupt"  # marks a sink-directory problem where a file is present but wrong
STUCK = "stuck"  # the http sink that never answers
STUCK_TIMEOUT = 3.0  # its deadline: each of its deliveries fails this long after it started
# Enough attempts that the hanging sink's deliveries outlast the run (its breaker pauses them too).
STUCK_RETRY = RetryPolicy(max_attempts=1000, backoff_base=0.5, backoff_cap=5.0)
# What every job ends as: delivered to the directory and the flaky receiver, still due for the stuck one.
SETTLED = "verified"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A SQLite file, or a private PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    with postgres_schema("chaos") as url:
        yield url


@dataclass
class Outcome:
    """Everything observed at the end; :meth:`findings` lists what is wrong."""

    job_ids: dict[str, str]  # job id -> output key
    expected_sha256: dict[str, str]  # job id -> SHA-256 of the sandbox's output object
    ledger_status: dict[str, str]
    unfinished_tasks: list[str]
    stuck_tasks: Counter[str]  # the hanging sink's deliveries by status
    task_attempts: Counter[str]  # kind/sink -> attempts summed over the ledger
    sink_files: list[str]
    filesystem_problems: list[str]
    attempts: list[Attempt]
    outage: OutageVerifications
    problems: list[str] = field(default_factory=list)  # from the harness: callbacks, processes

    @property
    def accepted(self) -> list[Attempt]:
        """Requests whose sender saw a whole 200: not the trickled ones, whatever their status line said."""
        return [a for a in self.attempts if a.accepted]

    @property
    def trickled(self) -> list[Attempt]:
        return [a for a in self.attempts if a.trickled_for is not None]

    def accepted_per_webhook_id(self) -> Counter[str]:
        return Counter(a.webhook_id for a in self.accepted)

    def corrupt(self, attempts: list[Attempt]) -> list[Attempt]:
        """Requests that are not exactly their job's output, signed, under that job's webhook-id."""
        by_webhook_id = {event_id(job_id, HTTP): job_id for job_id in self.job_ids}
        bad = []
        for attempt in attempts:
            job_id = by_webhook_id.get(attempt.webhook_id)
            if (
                job_id is None
                or attempt.event_id != attempt.webhook_id
                or attempt.job_id != job_id
                or not attempt.consistent
                or attempt.file_sha256 != self.expected_sha256[job_id]
            ):
                bad.append(attempt)
        return bad

    def in_both_sinks(self) -> set[str]:
        """Jobs whose exact output reached the directory and was accepted by the http receiver."""
        accepted_ids = {a.webhook_id for a in self.accepted if a not in self.corrupt(self.accepted)}
        broken_on_disk = {p.split(":", 1)[0] for p in self.filesystem_problems}
        return {
            job_id for job_id in self.job_ids if event_id(job_id, HTTP) in accepted_ids and job_id not in broken_on_disk
        }

    def findings(self) -> list[str]:
        found = list(self.problems)
        undelivered = {j: s for j, s in self.ledger_status.items() if s != SETTLED}
        missing = set(self.job_ids) - set(self.ledger_status)
        if undelivered:
            found.append(f"{len(undelivered)} jobs not {SETTLED} {dict(list(undelivered.items())[:5])}")
        if self.stuck_tasks != Counter({"pending": len(self.job_ids)}):
            found.append(f"the hanging sink's deliveries should all be pending: {dict(self.stuck_tasks)}")
        if missing:
            found.append(f"{len(missing)} jobs missing from the ledger {sorted(missing)[:5]}")
        if extra := set(self.ledger_status) - set(self.job_ids):
            found.append(f"{len(extra)} jobs in the ledger that were never submitted {sorted(extra)[:5]}")
        if self.unfinished_tasks:
            found.append(f"{len(self.unfinished_tasks)} tasks not done: {self.unfinished_tasks[:5]}")
        found += self.filesystem_problems[:20]
        for attempt in self.corrupt([a for a in self.attempts if a.complete])[:20]:
            found.append(f"corrupt http request: {attempt}")
        accepted_ids = {a.webhook_id for a in self.accepted}
        expected_ids = {event_id(job_id, HTTP) for job_id in self.job_ids}
        if accepted_ids != expected_ids:
            never, unknown = sorted(expected_ids - accepted_ids), sorted(accepted_ids - expected_ids)
            last = {a.webhook_id: answer_kind(a) for a in self.attempts}
            how = Counter(last.get(webhook_id, "never received") for webhook_id in never)
            found.append(
                f"{len(never)} webhook-ids never accepted {never[:5]} (the receiver's last answer to them: "
                f"{dict(how)}); unknown ones accepted {unknown[:5]}"
            )
        if outwaited := [a for a in self.trickled if a.outwaited]:
            found.append(
                f"{len(outwaited)} trickled answers were still awaited after {TRICKLE_LIMIT:g} s: "
                f"the http deadline did not cut them off ({sorted({a.webhook_id for a in outwaited})[:5]})"
            )
        return found


def answer_kind(attempt: Attempt) -> str:
    if not attempt.complete:
        return "cut off mid-body"
    if attempt.trickled_for is not None:
        return "trickled"
    return str(attempt.status)


@dataclass(frozen=True)
class OutageVerifications:
    """What the ledger recorded of verifications the CI outage refused."""

    failed: int  # verify attempts that got the outage's 503
    jobs: frozenset[str]  # the jobs they were for
    verified: int  # of those jobs, verified later by a retry of their own (the run never replays)
    latest_after_end: float | None  # seconds from the outage's end to the last of those verifications


@pytest.mark.timeout(DEADLINE + 180)  # the run stops itself at DEADLINE; then teardown
@pytest.mark.parametrize("callbacks", [CALLBACKS])
def test_nothing_is_lost_or_corrupted_under_chaos(
    callbacks: int, ledger_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The sandbox's server logs every request: thousands of lines that would bury a failure report.
    caplog.set_level(logging.WARNING, logger="werkzeug")
    started = time.monotonic()
    deadline = started + DEADLINE
    logs = tmp_path / "logs"
    logs.mkdir()
    sink_dir, staging = tmp_path / "delivered", tmp_path / "staging"
    staging.mkdir()
    stop = threading.Event()
    rng = random.Random(SEED)

    with (
        Sandbox(tmp_path / "sandbox", callback_shape=CallbackShape.EMPTY_BUCKETS).start() as sandbox,
        FlakySink(
            HTTP_KEY,
            failure_rate=HTTP_FAILURE_RATE,
            trickle_rate=HTTP_TRICKLE_RATE,
            trickle_limit=TRICKLE_LIMIT,
            seed=rng.randrange(2**32),
        ) as http_sink,
        Trickle(answer=None) as stuck_sink,
    ):
        config = tmp_path / "cos-webhook.toml"
        config.write_text(
            f'[[sinks]]\nname = "{STUCK}"\ntype = "http"\n'
            f'options = {{ url = "{stuck_sink.url}/hooks", secret_env = "WEBHOOK_HTTP_SINK_SECRET", '
            f"timeout = {STUCK_TIMEOUT} }}\n"
            f"retry = {{ max_attempts = {STUCK_RETRY.max_attempts}, backoff_base = {STUCK_RETRY.backoff_base}, "
            f"backoff_cap = {STUCK_RETRY.backoff_cap} }}\n"
        )
        settings = pipeline_settings(ledger_url, sandbox, sink_dir, http_sink.url + "hooks").replace(
            retry=RETRY,
            poll_interval=0.1,
            http_sink_timeout=HTTP_SINK_TIMEOUT,
        )
        env = settings_env(settings) | {
            "WEBHOOK_LEASE_SECONDS": str(LEASE_SECONDS),
            "WEBHOOK_HTTP_SINK_TIMEOUT": str(HTTP_SINK_TIMEOUT),
            "WEBHOOK_VERIFY_BACKOFF_CAP": str(VERIFY_BACKOFF_CAP),
            # A SIGKILLed worker cannot remove its staged download; keep those where we can count them.
            "WEBHOOK_TEMP_DIR": str(staging),
            "WEBHOOK_WORKER_CONCURRENCY": str(WORKER_CONCURRENCY),
            "WEBHOOK_CONFIG": str(config),
        }
        # settings_env() carries the delivery policy only: the worker processes read verification's
        # from WEBHOOK_VERIFY_* and its defaults. It must outlast the outage, or jobs die of it.
        verify_retry = Settings.from_env(env).verify_retry
        assert patience(verify_retry) > DEADLINE, f"{verify_retry} gives up within the run"
        ledger = Ledger(ledger_url)
        ledger.migrate()
        web = WebServer(env | {"WEB_CONCURRENCY": "2"}, logs / "web.log")
        fleet = WorkerFleet(env, logs, size=2)
        pump = CallbackPump(
            sandbox, f"{web.url}/callback/{TOKEN}", callbacks, DUPLICATE_SHARE, random.Random(rng.random()), deadline
        )
        outage = CiOutage(sandbox, after=callbacks // 3, seconds=CI_OUTAGE)
        threads = [
            Background("callback-pump", lambda: pump.run(stop)),
            Background(
                "worker-killer",
                lambda: kill_workers_now_and_then(
                    fleet, random.Random(rng.random()), stop, KILL_EVERY, max_kills=int(DEADLINE / KILL_EVERY[0])
                ),
            ),
            Background("web-restart", lambda: restart_web_halfway(web, sandbox, callbacks, stop)),
            Background("ci-outage", lambda: outage.run(stop)),
        ]
        worker_codes: list[int] = []
        run_seconds = 0.0
        try:
            web.start()
            fleet.start()
            for thread in threads:
                thread.start()
            run_started = time.monotonic()
            job_ids = submit_jobs(sandbox, f"{web.url}/callback/{TOKEN}", callbacks, tmp_path / "base.wav")
            wait_until_settled(ledger, callbacks, pump, threads, deadline)
            run_seconds = time.monotonic() - run_started
        finally:
            stop.set()
            for thread in threads:
                if thread.ident is not None:  # not started when the web server or a worker failed to
                    thread.join(timeout=30)
            worker_codes = fleet.stop()
            web.stop()
        for thread in threads:
            thread.check()

        outcome = observe(ledger, sandbox, job_ids, sink_dir, http_sink.attempts, outage)
        ledger.dispose()

    outcome.problems += pump.failures + fleet.unexpected_exits
    if any(code != 0 for code in worker_codes):
        outcome.problems.append(f"workers stopped with SIGTERM exited with {worker_codes}")
    if web.restarts != 1:
        outcome.problems.append(f"the web server was restarted {web.restarts} times, not once")
    if outage.started_at is None:
        outcome.problems.append("the CI outage never started")
    if not outcome.trickled:
        outcome.problems.append("no http answer was trickled")
    if not stuck_sink.requests:
        outcome.problems.append("the hanging sink was never tried")
    rows = report_rows(outcome, pump, fleet, web, outage, staging, logs, run_seconds)
    findings = outcome.findings()
    print_table(callbacks, rows)
    summary = tmp_path / "chaos-summary.json"
    trickles = [{"webhook_id": a.webhook_id, "seconds": round(a.trickled_for or 0, 3)} for a in outcome.trickled]
    summary.write_text(
        json.dumps(
            {"callbacks": callbacks, "seed": SEED, "rows": rows, "findings": findings, "trickled": trickles}, indent=2
        )
    )
    print(f"summary: {summary}")
    assert not findings, "\n".join(findings)


def patience(policy: RetryPolicy) -> float:
    """The shortest time ``policy`` keeps retrying a task that always fails: every wait at its least."""
    steps = (min(policy.backoff_cap, policy.backoff_base * 2.0**n) for n in range(policy.max_attempts - 1))
    waited = sum(step / 2 for step in steps)
    return float(waited if policy.max_age is None else min(waited, policy.max_age))


def restart_web_halfway(web: WebServer, sandbox: Sandbox, callbacks: int, stop: threading.Event) -> None:
    """Restart gunicorn once half the callbacks are out, while the other half keeps coming."""
    while len(sandbox.callbacks_sent) < callbacks // 2:
        if stop.wait(0.1):
            return
    web.restart(WEB_DOWN_SECONDS)


def marked_wav(frames: bytes, rate: int, index: int) -> bytes:
    """The base recording with ``index`` stamped in as four loud blocks, one per hex digit.

    Every job then has its own output, so a file delivered under the wrong job cannot pass for
    the right one. Blocks of 8 samples, 400 apart, survive the sandbox's moving average.
    """
    pcm = bytearray(frames)
    for digit in range(4):
        value = ((index >> (4 * digit)) & 0xF) * 2000 - 15000
        struct.pack_into("<8h", pcm, digit * 400 * 2, *([value] * 8))
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(bytes(pcm))
    return out.getvalue()


def submit_jobs(sandbox: Sandbox, callback_url: str, count: int, base: Path) -> dict[str, str]:
    """Upload ``count`` inputs and submit a job for each through the SDK; returns job id -> output key."""
    noisy_wav(base, INPUT_SECONDS)
    with wave.open(str(base), "rb") as reader:
        rate, frames = reader.getframerate(), reader.readframes(reader.getnframes())
    clients = threading.local()  # one SDK client per thread

    def submit(index: int) -> tuple[str, str]:
        if not hasattr(clients, "client"):
            clients.client = sandbox.client(REGION)
        client: CosS3Client = clients.client
        input_key, output_key = f"in/{index:05d}.wav", f"out/{index:05d}.wav"
        client.put_object(Bucket=BUCKET, Body=marked_wav(frames, rate, index), Key=input_key)
        # CI resolves the template to output_key when it writes.
        output = ObjectLocation(BUCKET, REGION, "out/${InputName}.${ext}" if index % 3 == 0 else output_key)
        # Both callback formats CI can send.
        callback_format = "JSON" if index % 2 else "XML"
        job_id = submit_noise_reduction(client, input_key, output, callback_url, callback_format, f"chaos-{index}")
        return job_id, output_key

    with ThreadPoolExecutor(SUBMIT_THREADS, thread_name_prefix="submit") as pool:
        return dict(pool.map(submit, range(count)))


def wait_until_settled(
    ledger: Ledger, callbacks: int, pump: CallbackPump, threads: list[Background], deadline: float
) -> None:
    """Until the ledger is quiescent (every job recorded, no task pending but the hanging sink's), a
    job is dead, or the deadline.

    Quiescent is final: a job gets its next task in the transaction that closes the previous
    one, so with nothing else pending nothing will change any more but the hanging sink's retries.
    """
    next_progress = time.monotonic() + 10
    while time.monotonic() < deadline:
        for thread in threads:
            thread.check()
        counts = ledger.views.counts()
        if counts.get("jobs_dead") or counts.get("jobs_rejected"):
            return  # neither recovers by itself; the findings name them
        recorded = sum(n for name, n in counts.items() if name.startswith("jobs_"))
        if pump.finished and recorded == callbacks and counts["tasks_pending"] == stuck_pending(ledger):
            return
        if time.monotonic() >= next_progress:
            print(f"  ... {counts} callbacks handled={pump.handled}", flush=True)
            next_progress += 10
        time.sleep(0.5)


def stuck_pending(ledger: Ledger) -> int:
    with ledger.engine.connect() as conn:
        query = sa.select(sa.func.count()).where(tasks.c.sink == STUCK, tasks.c.status == "pending")
        return int(conn.execute(query).scalar_one())


def observe(
    ledger: Ledger,
    sandbox: Sandbox,
    job_ids: dict[str, str],
    sink_dir: Path,
    attempts: list[Attempt],
    outage: CiOutage,
) -> Outcome:
    expected = {job_id: sandbox.object_path(BUCKET, key).read_bytes() for job_id, key in job_ids.items()}
    with ledger.engine.connect() as conn:
        verifications = conn.execute(
            sa.select(attempt_rows.c.job_id, attempt_rows.c.started_at, attempt_rows.c.outcome, attempt_rows.c.error)
            .where(attempt_rows.c.kind == Step.VERIFY)
            .order_by(attempt_rows.c.id)
        ).all()
        status = {row.job_id: row.status for row in conn.execute(sa.select(jobs.c.job_id, jobs.c.status))}
        task_rows = conn.execute(
            sa.select(tasks.c.job_id, tasks.c.kind, tasks.c.sink, tasks.c.status, tasks.c.attempts)
        )
        unfinished, task_attempts, stuck = [], Counter[str](), Counter[str]()
        kinds: dict[str, set[str]] = {job_id: set() for job_id in job_ids}
        for row in task_rows:
            name = f"{row.kind}/{row.sink}" if row.sink else row.kind
            task_attempts[name] += row.attempts
            kinds.setdefault(row.job_id, set()).add(name)
            if row.sink == STUCK:
                stuck[row.status] += 1
            elif row.status != "done":
                unfinished.append(f"{row.job_id} {name} {row.status} attempts={row.attempts}")
    # Every job needs its verification and one delivery per sink, all done but the hanging sink's.
    wanted = {"verify", f"deliver/{FILESYSTEM}", f"deliver/{HTTP}", f"deliver/{STUCK}"}
    unfinished += [f"{job_id} lacks {sorted(wanted - names)}" for job_id, names in kinds.items() if names != wanted]
    outcome = Outcome(
        job_ids=job_ids,
        expected_sha256={job_id: hashlib.sha256(data).hexdigest() for job_id, data in expected.items()},
        ledger_status=status,
        unfinished_tasks=unfinished,
        stuck_tasks=stuck,
        task_attempts=task_attempts,
        sink_files=sorted(p.name for p in sink_dir.iterdir() if p.name != PARTIAL_DIR) if sink_dir.exists() else [],
        filesystem_problems=check_directory(sink_dir, expected),
        attempts=list(attempts),
        outage=outage_verifications(verifications, outage),
    )
    if len(set(outcome.expected_sha256.values())) != len(job_ids):
        outcome.problems.append("the sandbox made identical outputs for different jobs: mix-ups would go unseen")
    return outcome


def outage_verifications(rows: Sequence[sa.Row[Any]], outage: CiOutage) -> OutageVerifications:
    """Which verify attempts the outage refused, and when the jobs they were for were verified after all."""
    refused = [row for row in rows if row.outcome != AttemptOutcome.OK and row.error.startswith(CI_UNAVAILABLE)]
    affected = frozenset(row.job_id for row in refused)
    verified_at = {
        row.job_id: row.started_at for row in rows if row.job_id in affected and row.outcome == AttemptOutcome.OK
    }
    latest = None
    if verified_at and outage.ended_at is not None:
        latest = (max(verified_at.values()) - outage.ended_at).total_seconds()
    return OutageVerifications(len(refused), affected, len(verified_at), latest)


def check_directory(sink_dir: Path, expected: dict[str, bytes]) -> list[str]:
    """``<job_id>: problem`` for every job whose two files are not exactly right, and any stray file."""
    names = {p.name for p in sink_dir.iterdir() if p.name != PARTIAL_DIR} if sink_dir.exists() else set()
    wanted = {f"{job_id}{ext}" for job_id in expected for ext in (".wav", ".event.json")}
    problems = [f"{name}: unexpected file in the sink directory" for name in sorted(names - wanted)]
    partial = sink_dir / PARTIAL_DIR
    if partial.is_dir():
        problems += [f"{PARTIAL_DIR}/{p.name}: temporary file left behind" for p in sorted(partial.iterdir())]
    for job_id, data in expected.items():
        wav, meta = sink_dir / f"{job_id}.wav", sink_dir / f"{job_id}.event.json"
        if not (wav.name in names and meta.name in names):
            problems.append(f"{job_id}: files missing ({sorted({wav.name, meta.name} - names)})")
            continue
        if wav.read_bytes() != data:
            problems.append(f"{job_id}: {CORRUPT} .wav: differs from the sandbox's output")
        document = json.loads(meta.read_text())
        file = document["file"] or {}
        described = (document["event_id"], document["job"]["job_id"], file.get("size"), file.get("crc64"))
        if described != (event_id(job_id, FILESYSTEM), job_id, len(data), str(crc64ecma(data))):
            problems.append(f"{job_id}: {CORRUPT} .event.json: describes {described}")
    return problems


def report_rows(
    outcome: Outcome,
    pump: CallbackPump,
    fleet: WorkerFleet,
    web: WebServer,
    outage: CiOutage,
    staging: Path,
    logs: Path,
    run_seconds: float,
) -> list[tuple[str, str]]:
    attempts, accepted, trickled = outcome.attempts, outcome.accepted, outcome.trickled
    stuck_tries = outcome.task_attempts[f"deliver/{STUCK}"]
    per_id = outcome.accepted_per_webhook_id()
    distinct = set(per_id)
    again = {webhook_id: n for webhook_id, n in per_id.items() if n > 1}
    hung_up_after = sorted(a.trickled_for or 0.0 for a in trickled)
    verified = outcome.outage
    in_sinks = outcome.in_both_sinks()
    wavs = sum(name.endswith(".wav") for name in outcome.sink_files)
    documents = sum(name.endswith(".event.json") for name in outcome.sink_files)
    worker_log = "".join(path.read_text(errors="replace") for path in fleet.logs)
    web_log = (logs / "web.log").read_text(errors="replace")
    delivered = sum(status == SETTLED for status in outcome.ledger_status.values())
    task_attempts = ", ".join(f"{name}={n}" for name, n in sorted(outcome.task_attempts.items()))
    # The SDK logs every error answer at ERROR itself: the outage's 503s are counted apart.
    errors, sdk_errors = worker_log.count(" ERROR "), worker_log.count(" ERROR qcloud_cos")
    leases_lost = worker_log.count("lease was lost")
    takeovers = [int(n) for n in re.findall(r"took over from dead workers \S+: (\d+) leased tasks", worker_log)]
    corrupt_on_disk = sum(f": {CORRUPT} " in problem for problem in outcome.filesystem_problems)
    parts, staged = list(staging.rglob("*.part")), list(staging.rglob("*.staged"))
    return [
        ("INJECTED", ""),
        ("callbacks (jobs submitted via the SDK)", str(len(outcome.job_ids))),
        ("  sandbox POST attempts (its own retries incl.)", str(pump.sandbox_attempts)),
        ("  delivered by the sandbox", str(pump.delivered_by_sandbox)),
        ("callbacks re-posted after the sandbox gave up", str(pump.reposted)),
        ("  re-post attempts / found already stored", f"{pump.repost_attempts} / {pump.reposts_found_stored}"),
        ("duplicate callbacks sent / answered duplicate", f"{pump.duplicates_sent} / {pump.duplicates_recognised}"),
        ("worker SIGKILLs (replaced at once)", str(fleet.kills)),
        ("  takeovers from killed workers / leased tasks freed", f"{len(takeovers)} / {sum(takeovers)}"),
        ("web (gunicorn) restarts", f"{web.restarts} (down {WEB_DOWN_SECONDS:g} s)"),
        ("CI DescribeMediaJob answering 503", outage_label(outage)),
        ("  describe requests refused (the SDK retries once)", str(outage.refused)),
        ("  verify attempts failed / jobs they were for", f"{verified.failed} / {len(verified.jobs)}"),
        ("http 503s injected", str(sum(a.status == 503 for a in attempts))),
        (f"http answers trickled (1 byte/s; deadline {HTTP_SINK_TIMEOUT:g} s)", str(len(trickled))),
        ("  sender hung up after (median / max)", seconds_range(hung_up_after)),
        ("http attempts (requests received)", str(len(attempts))),
        ("  cut off mid-body by a kill", str(sum(not a.complete for a in attempts))),
        ("SURVIVED", ""),
        (f"jobs {SETTLED} (ledger; the hanging sink's deliveries pending)", str(delivered)),
        ("  hanging sink: deliveries pending / their attempts", f"{outcome.stuck_tasks['pending']} / {stuck_tries}"),
        ("  ledger attempts per task", task_attempts),
        ("jobs verified after the CI outage (no replay)", outage_recovery(verified)),
        ("filesystem deliveries (.wav / .event.json)", f"{wavs} / {documents}"),
        ("  other files in the sink directory", str(len(outcome.sink_files) - wavs - documents)),
        ("http deliveries accepted (whole 200 seen)", str(len(accepted))),
        ("  distinct webhook-ids accepted", str(len(distinct))),
        ("  webhook-ids accepted again / extra acceptances", f"{len(again)} / {sum(again.values()) - len(again)}"),
        ("corrupt deliveries (http accepted / on disk)", f"{len(outcome.corrupt(accepted))} / {corrupt_on_disk}"),
        ("jobs lost (missing or wrong in a sink)", str(len(outcome.job_ids) - len(in_sinks))),
        (f"jobs not '{SETTLED}' in the ledger", str(len(outcome.job_ids) - delivered)),
        ("staging left behind (partial .part / whole .staged)", f"{len(parts)} / {len(staged)}"),
        ("worker log: ERROR lines (the SDK's of them) / lease lost", f"{errors} ({sdk_errors}) / {leases_lost}"),
        ("web log: tracebacks", str(web_log.count("Traceback"))),
        ("wall time (submit -> ledger settled)", f"{run_seconds:.1f} s"),
    ]


def outage_label(outage: CiOutage) -> str:
    if outage.started_at is None:
        return "never started"
    return f"{outage.lasted:.1f} s, from callback {outage.after} on"


def outage_recovery(verified: OutageVerifications) -> str:
    text = f"{verified.verified} of {len(verified.jobs)}"
    if verified.latest_after_end is not None:
        text += f", the last {verified.latest_after_end:.1f} s after it ended"
    return text


def seconds_range(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} / {max(values):.2f} s" if values else "-"


def print_table(callbacks: int, rows: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"chaos run: CHAOS_CALLBACKS={callbacks} seed={SEED}", "-" * (width + 24)]
    for label, value in rows:
        lines.append(f"{label:<{width}}{value}" if value else f"{label}")
    print("\n" + "\n".join(lines), flush=True)
