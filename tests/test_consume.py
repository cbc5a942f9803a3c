"""``cos-webhook consume``: TDMQ messages recorded as callbacks, at least once, nothing lost, nothing doubled."""

from __future__ import annotations

import base64
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from support.pipeline import BUCKET, REGION, Pipeline, pipeline_settings, settings_env, working
from support.receiver import Receiver
from support.sink_dir import written
from support.tdmq import (
    QUEUE,
    as_json,
    as_xml,
    client,
    consumer,
    consuming,
    counts,
    forged_document,
    start_consumer,
    submit_with_tdmq,
    tdmq_env,
)

from webhook.cli import main
from webhook.dev.sandbox import Sandbox, noisy_wav
from webhook.dev.sandbox.cmq import CmqFault
from webhook.intake import consumer as consume
from webhook.intake.callback import CallbackError
from webhook.ledger import Ledger, LedgerUnavailable
from webhook.ledger.quarantine import Quarantine
from webhook.ledger.schema import callbacks
from webhook.models import Callback
from webhook.sinks.events import event_id


@pytest.fixture
def quick(tmp_path: Path) -> Iterator[Sandbox]:
    """A sandbox whose messages come back one second after they were received and not deleted."""
    with Sandbox(tmp_path / "sandbox", cmq_visibility_timeout=1.0).start() as sandbox:
        yield sandbox


def cli(database_url: str, *args: str, **env: str) -> Result:
    """A command as an operator runs it; the signal handlers ``consume`` installs are put back after."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        return CliRunner().invoke(main, list(args), env={"WEBHOOK_DATABASE_URL": database_url, **env})
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def statuses(ledger: Ledger) -> dict[str, str]:
    return {view.job_id: view.status for view in ledger.views.list_jobs(limit=10_000)}


# --- recording -----------------------------------------------------------------------------------


def test_messages_are_recorded_as_posted_callbacks_are_then_deleted(ledger: Ledger, sandbox: Sandbox) -> None:
    cmq = client(sandbox)
    cmq.send(QUEUE, as_json(forged_document("j1")))
    cmq.send(QUEUE, as_xml(forged_document("j2")))
    wrapped = base64.b64encode(as_json(forged_document("j3")).encode()).decode()
    cmq.send(QUEUE, wrapped)
    running = consumer(sandbox, ledger, wait=0)
    assert running.poll_once(QUEUE) == 3
    assert sandbox.cmq.pending(QUEUE) == 0  # deleted, after the commits
    assert statuses(ledger) == {"j1": "received", "j2": "received", "j3": "received"}
    assert [t.kind for t in ledger.views.show_job("j3").tasks] == ["verify"]
    [raw] = ledger.views.raw_callbacks("j3")
    assert raw.remote_addr == "tdmq"
    assert raw.body == as_json(forged_document("j3")).encode()  # the document, unwrapped
    headers = json.loads(raw.headers)
    assert (headers["X-Tdmq-Queue"], headers["X-Tdmq-Body"]) == (QUEUE, "base64")

    # The same callback again (a delete that was lost): a duplicate, nothing new to verify.
    before = counts(ledger)
    cmq.send(QUEUE, as_xml(forged_document("j1")))
    assert running.poll_once(QUEUE) == 1
    assert counts(ledger) == before | {"callbacks": before["callbacks"] + 1}
    assert sandbox.cmq.pending(QUEUE) == 0
    running.client.close()


@pytest.mark.slow  # waits out a visibility timeout
def test_a_poisoned_message_is_kept_visible_and_does_not_block_the_queue(
    ledger: Ledger, quick: Sandbox, database_url: str
) -> None:
    cmq = client(quick)
    poison = cmq.send(QUEUE, "this is not a callback\n\x1b[31m")
    cmq.send(QUEUE, as_json(forged_document("j1")))
    quick.cmq.add_fault(CmqFault(action="BatchDeleteMessage", status=503, times=1))
    running = consumer(quick, ledger, wait=0)
    running.poll_once(QUEUE)  # both stored; their delete fails, so both come back
    wait_until(lambda: running.poll_once(QUEUE) == 2, 5, "the batch to come back")
    assert quick.cmq.pending(QUEUE) == 0
    assert statuses(ledger) == {"j1": "received"}
    [kept] = Quarantine(ledger.engine).listed()
    assert (kept.queue, kept.msg_id, kept.deliveries) == (QUEUE, poison, 2)  # one row, handed over twice
    assert kept.body == b"this is not a callback\n\x1b[31m"
    assert kept.reason == "the message body is neither XML, JSON nor base64"
    running.client.close()

    dead = cli(database_url, "dead", "list")
    assert dead.exit_code == 0, dead.output
    assert dead.output.splitlines()[1].startswith(f"message {kept.id}")
    assert f"{QUEUE}/{poison}: the message body is neither XML, JSON nor base64" in dead.output
    [letter] = [json.loads(line) for line in cli(database_url, "dead", "list", "--json").output.splitlines()]
    assert letter | {"received_at": "-", "updated_at": "-"} == {
        "kind": "message",
        "id": kept.id,
        "queue": QUEUE,
        "msg_id": poison,
        "status": "quarantined",
        "reason": "the message body is neither XML, JSON nor base64",
        "deliveries": 2,
        "callback_id": None,
        "received_at": "-",
        "updated_at": "-",
    }
    assert cli(database_url, "dead", "list", "--sink", "http").output.splitlines()[1:] == []
    listed = cli(database_url, "messages", "list").output.splitlines()
    assert len(listed) == 2
    assert re.search(r" \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  ", listed[1]), listed  # UTC, marked
    shown = cli(database_url, "messages", "show", str(kept.id))
    assert "  | this is not a callback" in shown.output
    assert "\x1b" not in shown.output  # control characters are escaped
    assert "\\x1b[31m" in shown.output


def test_a_kept_message_is_recorded_once_a_fix_makes_it_readable(
    ledger: Ledger, sandbox: Sandbox, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(body: bytes) -> Callback:
        raise CallbackError("a parser bug")

    monkeypatch.setattr(consume, "parse_callback", broken)
    cmq = client(sandbox)
    cmq.send(QUEUE, as_xml(forged_document("j9")))
    cmq.send(QUEUE, "still not a callback")
    consumer(sandbox, ledger, wait=0).poll_once(QUEUE)
    fixable, hopeless = Quarantine(ledger.engine).listed()
    assert fixable.reason == "a parser bug"
    assert statuses(ledger) == {}
    monkeypatch.undo()  # the fix

    result = cli(database_url, "messages", "reparse", "--all")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0].startswith(f"message {fixable.id}: recorded as callback ")
    assert lines[0].endswith("(j9)")
    assert lines[1] == f"message {hopeless.id}: still unreadable: the message body is neither XML, JSON nor base64"
    assert lines[2] == "Error: 1 of 2 messages are still unreadable"
    assert statuses(ledger) == {"j9": "received"}
    [raw] = ledger.views.raw_callbacks("j9")
    assert json.loads(raw.headers)["X-Reparsed-From"] == f"message {fixable.id}"
    assert [m.id for m in Quarantine(ledger.engine).listed()] == [hopeless.id]
    assert Quarantine(ledger.engine).get(fixable.id).status == "recorded"
    again = cli(database_url, "messages", "reparse", str(fixable.id))
    assert again.exit_code == 0
    assert again.output.startswith(f"message {fixable.id}: already recorded as callback")
    assert cli(database_url, "messages", "reparse").exit_code == 2  # ids or --all
    assert "no kept message #999" in cli(database_url, "messages", "show", "999").output


# --- failures -----------------------------------------------------------------------------------


@pytest.mark.slow  # waits out a visibility timeout
def test_rate_limits_server_errors_and_failed_deletes_are_waited_out(ledger: Ledger, quick: Sandbox) -> None:
    client(quick).send(QUEUE, as_json(forged_document("j1")))
    for fault in (
        CmqFault(action="BatchReceiveMessage", code=4420, times=2),
        CmqFault(action="BatchReceiveMessage", status=503, times=1),
        CmqFault(action="BatchDeleteMessage", status=502, times=1),  # not deleted: it comes back
    ):
        quick.cmq.add_fault(fault)
    with consuming(consumer(quick, ledger)) as running:
        wait_until(lambda: counts(ledger)["callbacks"] == 2 and quick.cmq.pending(QUEUE) == 0, 15, "the message")
        assert running.failure is None
    assert counts(ledger) == {"callbacks": 2, "jobs": 1, "job_versions": 1}  # the second time a duplicate


def test_a_ledger_outage_leaves_the_batch_on_the_queue(sandbox: Sandbox, tmp_path: Path) -> None:
    client(sandbox).send(QUEUE, as_json(forged_document("j1")))
    unmigrated = Ledger(f"sqlite:///{tmp_path / 'empty.db'}")  # no tables: every write fails
    with pytest.raises(LedgerUnavailable, match=r"^ledger unavailable \(OperationalError\)$"):
        consumer(sandbox, unmigrated, wait=0).poll_once(QUEUE)
    assert sandbox.cmq.pending(QUEUE) == 1  # not deleted: it comes back after the visibility timeout
    unmigrated.dispose()


def test_bad_credentials_or_a_missing_queue_stop_the_consumer_saying_what_to_fix(
    ledger: Ledger, sandbox: Sandbox, database_url: str
) -> None:
    env = tdmq_env(sandbox) | {"TDMQ_SECRET_ID": sandbox.secret_id, "TDMQ_SECRET_KEY": "not-the-key"}
    refused = cli(database_url, "consume", "--wait", "0", **env)
    assert refused.exit_code == 1
    assert "code 4100" in refused.output
    assert "check TDMQ_SECRET_ID and TDMQ_SECRET_KEY" in refused.output
    assert "not-the-key" not in refused.output

    sandbox.cmq.add_fault(CmqFault(action="BatchReceiveMessage", code=4440, times=1))
    env["TDMQ_SECRET_KEY"] = sandbox.secret_key
    missing = cli(database_url, "consume", "--wait", "0", **env)
    assert missing.exit_code == 1
    assert f"has no queue {QUEUE} (code 4440" in missing.output

    no_queue = cli(database_url, "consume", **(env | {"WEBHOOK_TDMQ_QUEUE": ""}))
    assert no_queue.exit_code == 1
    assert "configuration error: WEBHOOK_TDMQ_QUEUE is not set" in no_queue.output


@pytest.mark.slow  # a consumer process
def test_sigterm_cuts_the_long_poll_and_exits_at_once(
    ledger: Ledger, sandbox: Sandbox, database_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "consumer.log"
    env = {
        "WEBHOOK_DATABASE_URL": database_url,
        "COS_SECRET_ID": sandbox.secret_id,
        "COS_SECRET_KEY": sandbox.secret_key,
    }
    sandbox.cmq.add_fault(CmqFault(action="BatchReceiveMessage", delay=0.001))  # counts the long polls
    proc = start_consumer(env | tdmq_env(sandbox), log)
    try:
        client(sandbox).send(QUEUE, as_json(forged_document("j1")))
        wait_until(lambda: statuses(ledger) == {"j1": "received"}, 20, "the consumer to record a message")
        # The first poll brought the message (sent before or during it): the second is the next one.
        wait_until(lambda: sandbox.cmq.faults()[0]["fired"] >= 2, 20, "the next long poll (it would last 30 s)")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, log.read_text()
    finally:
        proc.kill()
    assert time.monotonic() - started < 5
    logged = log.read_text()
    assert "consumer stopping (signal SIGTERM)" in logged
    assert "consumer stopped" in logged
    assert sandbox.secret_key not in logged


# --- the whole loop ----------------------------------------------------------------------------


def upload(sandbox: Sandbox, tmp_path: Path) -> str:
    noisy_wav(tmp_path / "input.wav", 0.1)
    sandbox.client(REGION).put_object(Bucket=BUCKET, Key="in/noisy.wav", Body=(tmp_path / "input.wav").read_bytes())
    return "in/noisy.wav"


def assert_delivered_once(job_ids: list[str], http: Receiver, sink_dir: Path) -> None:
    """Each job reached each sink once: one http event per job, and its two files."""
    ids = [r.headers["webhook-id"] for r in http.requests]
    assert sorted(ids) == sorted(event_id(job_id, "http") for job_id in job_ids)
    names = written(sink_dir)
    assert names == sorted(f"{job_id}{ext}" for job_id in job_ids for ext in (".wav", ".event.json"))


@pytest.mark.slow  # 200 jobs through CI, TDMQ, the consumer, the worker and two sinks
def test_200_jobs_through_tdmq_are_delivered_with_no_http_endpoint(
    database_url: str, sandbox: Sandbox, http_sink: Receiver, tmp_path: Path
) -> None:
    settings = pipeline_settings(database_url, sandbox, tmp_path / "delivered", http_sink.url + "hooks")
    ledger = Ledger(database_url)
    ledger.migrate()  # and no receiver: the callbacks can only come through TDMQ
    key = upload(sandbox, tmp_path)
    with consuming(consumer(sandbox, ledger)), working(settings, ledger):
        job_ids = [submit_with_tdmq(sandbox, key, f"out/{n}.wav", ("JSON", "XML")[n % 2]) for n in range(200)]
        wait_until(
            lambda: set(statuses(ledger).values()) == {"delivered"} and len(statuses(ledger)) == 200,
            150,
            "200 jobs delivered",
        )
    assert {sent.url for sent in sandbox.callbacks_sent} == {f"tdmq://gz/{QUEUE}"}
    assert sandbox.cmq.pending(QUEUE) == 0
    assert_delivered_once(job_ids, http_sink, tmp_path / "delivered")
    ledger.dispose()


@pytest.mark.slow  # consumer processes, SIGKILLed and restarted
def test_sigkill_mid_batch_then_restart_loses_nothing_and_delivers_each_job_once(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    sandbox, ledger = pipeline.sandbox, pipeline.ledger
    sandbox.cmq.visibility_timeout = 2.0
    key = upload(sandbox, tmp_path)
    job_ids = [submit_with_tdmq(sandbox, key, f"out/{n}.wav") for n in range(30)]
    sandbox.wait_for_callbacks(30, timeout=60)
    # The first batch (16) is recorded, then its delete hangs: the process dies with it in hand.
    sandbox.cmq.add_fault(CmqFault(action="BatchDeleteMessage", delay=60, status=503, times=1))
    env = settings_env(pipeline.settings) | tdmq_env(sandbox)
    log = tmp_path / "consumer.log"
    first = start_consumer(env, log)
    try:
        wait_until(lambda: sandbox.cmq.faults() == [] and counts(ledger)["jobs"] == 16, 30, "the delete of a batch")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    sandbox.cmq.clear_faults()  # ends the hung delete, which deleted nothing
    assert sandbox.cmq.pending(QUEUE) == 30

    second = start_consumer(env, log)
    try:
        with working(pipeline.settings, ledger):
            wait_until(lambda: list(set(statuses(ledger).values())) == ["delivered"], 60, "every job delivered")
            wait_until(lambda: sandbox.cmq.pending(QUEUE) == 0, 10, "the queue to empty")
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0, log.read_text()
    assert sorted(statuses(ledger)) == sorted(job_ids)
    # The 16 in hand came back and were recorded again: duplicates, so no job and no version twice.
    # (The worker's reconcile may have recorded the others first, from CI's job list: duplicates too.)
    assert counts(ledger) | {"callbacks": 0} == {"callbacks": 0, "jobs": 30, "job_versions": 30}
    with ledger.engine.connect() as conn:
        consumed = conn.execute(sa.select(sa.func.count()).where(callbacks.c.remote_addr == "tdmq")).scalar_one()
    assert consumed == 16 + 30, log.read_text()
    assert_delivered_once(job_ids, pipeline.http, pipeline.sink_dir)


@pytest.mark.slow  # many batches, some of them back after the visibility timeout
def test_deletes_that_lose_their_reply_or_fail_still_record_every_job_once(ledger: Ledger, quick: Sandbox) -> None:
    cmq = client(quick)
    for n in range(60):
        cmq.send(QUEUE, (as_json, as_xml)[n % 2](forged_document(f"j{n}")))
    # Of the batch deletes, about 30% are carried out with their reply lost, and 30% fail outright.
    quick.cmq.add_fault(CmqFault(action="BatchDeleteMessage", drop_reply=True, rate=0.3, seed=7))
    quick.cmq.add_fault(CmqFault(action="BatchDeleteMessage", status=503, rate=0.3, seed=8))
    with consuming(consumer(quick, ledger, batch=4)):
        wait_until(lambda: quick.cmq.pending(QUEUE) == 0, 60, "the queue to empty")
    fired = {fault["drop_reply"]: fault["fired"] for fault in quick.cmq.faults()}
    assert fired[True] > 0
    assert fired[False] > 0
    found = counts(ledger)
    assert (found["jobs"], found["job_versions"]) == (60, 60)
    assert found["callbacks"] > 60  # the failed deletes' batches were recorded again, as duplicates
    assert set(statuses(ledger).values()) == {"received"}
