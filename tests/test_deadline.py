"""Deadlines for whole exchanges, against real slow servers over real sockets.

A server that trickles its answer a byte at a time never trips a per-read timeout; these tests
show every exchange through a deadline-aware session (the COS SDK's included) is cut off anyway.
Durations are short and generous either way; the assertions are about what happened, not when.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests
from qcloud_cos.cos_exception import CosClientError
from support.receiver import Receiver
from support.trickle import Trickle, response, self_signed

from webhook.alarm import ALARMS
from webhook.ci.client import client_timeout, cos_deadline, make_client
from webhook.ci.verify import VerifyError, describe_job
from webhook.config_values import parse_endpoint
from webhook.deadline import Deadline, DeadlineExceeded, current, deadline_session, expire_all, transfer_budget
from webhook.models import Job
from webhook.sinks import DeliveryError
from webhook.sinks.cos import CosSink
from webhook.sinks.events import build_event
from webhook.sinks.options import CosOptions

BUCKET, REGION = "audio-1250000000", "ap-guangzhou"


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with deadline_session() as session:
        yield session


def in_thread(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


# --- the Deadline itself ------------------------------------------------------------------


def test_a_deadline_is_current_only_inside_and_nests() -> None:
    assert current() is None
    with Deadline(10, "outer") as outer:
        assert current() is outer
        with Deadline(5, "inner") as inner:
            assert current() is inner
            assert not inner.expired
            assert 0 < inner.remaining <= 5
        assert current() is outer
        with Deadline(5, "next") as following:  # sequential use after a nested one
            assert current() is following
    assert current() is None
    assert not outer.expired


def test_abandoning_an_outer_deadline_expires_the_inner_one() -> None:
    with Deadline(10, "outer") as outer, Deadline(10, "inner") as inner:
        outer.expire_now("worker shutting down")
        assert inner.expired
        assert inner.remaining == 0
        assert inner.passed_message() == "abandoned: worker shutting down"


def test_messages_say_what_ended_the_work() -> None:
    with Deadline(30, "a") as deadline:
        assert deadline.passed_message() == "no complete answer within 30s (deadline)"
        deadline.extend(200.4)
        assert deadline.passed_message() == "no complete answer within 230s (deadline)"
        deadline.expire_now()
        assert deadline.expired
        assert deadline.passed_message() == "abandoned"
    with Deadline(0.5 + 300 / (1024 * 1024), "b") as small:
        assert small.passed_message() == "no complete answer within 0.5s (deadline)"
    for reason in ("worker shutting down", "abandoned: worker shutting down"):
        with Deadline(30, "c") as deadline:
            deadline.expire_now(reason)
            assert deadline.passed_message() == "abandoned: worker shutting down"


def test_the_transfer_rule() -> None:
    assert transfer_budget(30, 200 * 1024 * 1024, 1024 * 1024) == 230
    assert transfer_budget(30, 0, 1024 * 1024) == 30


def test_expiry_is_frozen_at_exit() -> None:
    with Deadline(0.05, "quick") as deadline:
        pass
    threading.Event().wait(0.1)
    assert not deadline.expired  # it did not pass while it was in force


def test_a_deadline_is_entered_once() -> None:
    deadline = Deadline(1, "once")
    with deadline, pytest.raises(RuntimeError, match="entered twice"), deadline:
        pass


def test_timers_do_not_outlive_their_deadlines() -> None:
    for _ in range(20):
        with Deadline(60, "short-lived") as deadline:
            deadline.extend(60)
    for thread in threading.enumerate():
        if thread.name.startswith("deadline"):
            thread.join(timeout=5)
            assert not thread.is_alive(), thread.name


def test_deadlines_share_one_alarm_thread() -> None:
    before = threading.active_count()
    with ExitStack() as stack:
        for i in range(200):
            stack.enter_context(Deadline(60, f"open {i}")).extend(60)
        assert threading.active_count() <= before + 1  # at most the alarm thread, started now
        assert ALARMS.pending() >= 200


def test_exited_deadlines_leave_no_alarm_set() -> None:
    before = ALARMS.pending()
    for _ in range(20):
        with Deadline(60, "short-lived") as deadline:
            deadline.extend(60)
    assert ALARMS.pending() == before


# --- the deadline-aware session -------------------------------------------------------------


@pytest.mark.slow  # a deadline of a second runs out
def test_a_trickling_answer_is_cut_off(session: requests.Session) -> None:
    with Trickle(every=0.3) as server, Deadline(1, "GET trickle") as deadline:
        with pytest.raises(DeadlineExceeded) as caught:
            session.get(server.url, timeout=1)  # each byte arrives well within the read timeout
        assert deadline.expired
    assert str(caught.value) == "GET trickle: no complete answer within 1s (deadline)"


@pytest.mark.slow  # a deadline of a second runs out
@pytest.mark.parametrize("stream", [False, True])
def test_headers_cut_off_mid_way_are_not_an_answer(session: requests.Session, stream: bool) -> None:
    # A whole status line, then the headers trickle: the severed socket's end must not pass for
    # the end of the headers (a "200" whose headers never finished).
    with (
        Trickle(every=0.3, head=len(b"HTTP/1.1 200 OK\r\n")) as server,
        Deadline(1, "GET slow headers"),
        pytest.raises(DeadlineExceeded, match="no complete answer within 1s"),
    ):
        session.get(server.url, timeout=1, stream=stream)


def test_an_extended_deadline_cuts_off_at_its_new_time(session: requests.Session) -> None:
    started = time.monotonic()
    with Trickle(every=0.1) as server, Deadline(0.2, "GET trickle") as deadline:
        deadline.extend(0.6)  # the alarm for 0.2s from now must not cut the exchange
        with pytest.raises(DeadlineExceeded, match=r"no complete answer within 0\.8s"):
            session.get(server.url, timeout=60)
    assert time.monotonic() - started >= 0.75


def test_a_forked_child_has_deadlines_of_its_own() -> None:
    with Deadline(60, "in the parent"):
        pass  # the parent's alarm thread runs when it forks; the child has none
    with Trickle(every=0.3) as server:  # the parent's threads serve the child too
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: answer through the pipe, and leave without cleanup
            said = "no answer"
            try:
                os.close(read)
                with deadline_session() as session, Deadline(0.5, "GET from the child"):
                    session.get(server.url, timeout=60)
            except requests.RequestException as exc:
                said = str(exc)
            finally:
                os.write(write, said.encode())
                os._exit(0)
        os.close(write)
        ready, _, _ = select.select([read], [], [], 20)
        if not ready:
            os.kill(pid, signal.SIGKILL)  # its exchange was never cut off
        said = os.read(read, 1000).decode() if ready else "still waiting after 20s"
        os.close(read)
        os.waitpid(pid, 0)
    assert said == "GET from the child: no complete answer within 0.5s (deadline)"


def test_a_server_that_never_answers_is_cut_off(session: requests.Session) -> None:
    expected = r"^GET hang: no complete answer within 0\.5s \(deadline\)$"
    with Trickle(answer=None) as server, Deadline(0.5, "GET hang"), pytest.raises(DeadlineExceeded, match=expected):
        session.get(server.url, timeout=60)


def test_a_reused_keep_alive_connection_is_cut_off_too(session: requests.Session) -> None:
    with Trickle(first=response(b"hello")) as server:
        assert session.get(server.url, timeout=5).text == "hello"  # no deadline: a plain session
        with Deadline(0.5, "GET again"), pytest.raises(DeadlineExceeded):
            session.get(server.url, timeout=60)
        assert server.connections == 1  # the second request went over the first connection


def test_tls_is_verified_as_requests_does_and_cut_off_alike(session: requests.Session, tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    context, certificate = self_signed(tmp_path)
    with Trickle(tls=context, first=response(b"hello")) as server:
        with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
            session.get(server.url, timeout=5)  # an unknown certificate is refused
        assert session.get(server.url, timeout=5, verify=str(certificate)).text == "hello"
        with Deadline(0.5, "GET over TLS"), pytest.raises(DeadlineExceeded, match="deadline"):
            session.get(server.url, timeout=60, verify=str(certificate))  # the same connection, trickling
        assert server.connections == 2  # the refused one, then one for both verified requests


def test_nothing_starts_after_the_deadline(session: requests.Session) -> None:
    with Trickle(first=response(b"hello")) as server, Deadline(5, "late") as deadline:
        deadline.expire_now("too late")
        with pytest.raises(DeadlineExceeded, match=r"^late: abandoned: too late$"):
            session.get(server.url, timeout=5)
        assert server.requests == 0


def test_a_normal_server_answers_within_the_deadline(session: requests.Session) -> None:
    with Receiver() as receiver, Deadline(5, "POST"):
        answer = session.post(receiver.url, data=b"x" * 100_000, timeout=5)
    assert answer.status_code == 200
    assert receiver.requests[0].size == 100_000


def test_expire_all_unblocks_a_call_from_another_thread(session: requests.Session) -> None:
    errors: list[BaseException] = []

    def call() -> None:
        with Deadline(60, "GET trickle"):
            try:
                session.get(server.url, timeout=60)
            except requests.RequestException as exc:
                errors.append(exc)

    with Trickle(every=0.3) as server:
        caller = in_thread(call)
        server.wait_for_requests(1)
        assert expire_all("worker shutting down") >= 1
        caller.join(timeout=10)
        assert not caller.is_alive()
    assert [str(error) for error in errors] == ["GET trickle: abandoned: worker shutting down"]


# --- the COS SDK through make_client ------------------------------------------------------


@pytest.mark.slow  # a deadline of a second runs out
def test_describe_job_against_a_trickling_ci_api_passes_its_deadline() -> None:
    with Trickle(every=0.3) as server:
        client = make_client("id", "key", REGION, endpoint=parse_endpoint(server.url), timeout=1)
        assert client_timeout(client) == 1
        with pytest.raises(VerifyError) as caught:
            describe_job(client, BUCKET, "j" + "0" * 32)
    assert caught.value.args[0] == "CI API: no complete answer within 1s (deadline)"


def test_describe_job_abandoned_by_expire_all() -> None:
    errors: list[BaseException] = []

    def verify() -> None:
        try:
            describe_job(client, BUCKET, "j" + "0" * 32)
        except VerifyError as exc:
            errors.append(exc)

    with Trickle(answer=None) as server:
        client = make_client("id", "key", REGION, endpoint=parse_endpoint(server.url), timeout=60)
        verifier = in_thread(verify)
        server.wait_for_requests(1)
        expire_all("worker shutting down")
        verifier.join(timeout=10)
        assert not verifier.is_alive()
    assert [str(error) for error in errors] == ["CI API: abandoned: worker shutting down"]


def test_a_cos_call_under_cos_deadline() -> None:
    with Trickle(every=0.3) as server:
        client = make_client("id", "key", REGION, endpoint=parse_endpoint(server.url), timeout=60)
        with (
            cos_deadline(client, "HeadBucket", timeout=0.5) as deadline,
            pytest.raises(CosClientError, match="deadline"),
        ):
            client.head_bucket(Bucket=BUCKET)
        assert deadline.expired
        assert server.requests == 1  # the SDK does not retry past the deadline


def test_cos_sink_delivery_passes_its_deadline(tmp_path: Path) -> None:
    job = Job(job_id="job-2", tag="NoiseReduction", state="Failed", code="InvalidInput", message="bad audio")
    with Trickle(every=0.3) as server:
        options = CosOptions(bucket="archive-1250000000", region=REGION, endpoint=server.url)
        sink = CosSink("archive", options, secret_id="id", secret_key="key", default_endpoint=None, timeout=0.5)
        with pytest.raises(DeliveryError) as caught:
            sink.deliver(build_event(job, "archive", None))
    assert not caught.value.permanent
    assert caught.value.message == (
        "archive: put_object cos://archive-1250000000/job-2.event.json: no complete answer within 0.5s (deadline)"
    )
