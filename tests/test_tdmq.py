"""The CMQ client and its signature, the sandbox's CMQ stand-in, and its CI side's TDMQ callbacks."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from support.pipeline import BUCKET, REGION
from support.tdmq import MQ, QUEUE, as_json, as_xml, client, forged_document, submit_with_tdmq

from webhook.ci.submit import mq_config, submit_noise_reduction
from webhook.config import Settings
from webhook.dev.sandbox import Sandbox, noisy_wav
from webhook.dev.sandbox.cmq import CmqFault, verify_signature
from webhook.dev.sandbox.submission import JobRequestError, new_job
from webhook.errors import ConfigError
from webhook.intake.consumer import Unreadable, explain, read_message
from webhook.intake.tdmq import (
    PATH,
    CmqClient,
    CmqError,
    _answer,
    credentials,
    host_of,
    parse_messages,
    sign,
    string_to_sign,
)
from webhook.models import ObjectLocation

# The example of TDMQ-CMQ's signature document (406/5906), as it was published before its keys were
# masked: a SendMessage request, its parameters, and the signature the document gives for them.
DOC_HOST = "cmq-queue-gz.api.tencentyun.com"
DOC_KEY = "pPgfLipfEXZ7VcRzhAMIyPaU7UbQyFFx"
DOC_PARAMS = {
    "Action": "SendMessage",
    "Nonce": "2889712707386595659",
    "RequestClient": "SDK_Python_1.3",
    "SecretId": "AKIDPcYDclDJCn8D0Xypa4f3pKYUCVYLn3zT",
    "SignatureMethod": "HmacSHA1",
    "Timestamp": "1534154812",
    "clientRequestId": "1231231231",
    "delaySeconds": "0",
    "msgBody": "msg",
    "queueName": "test1",
}
DOC_SIGNATURE = "C16WEtEXsD5v5tnaUMLAbZewXhI="


@pytest.fixture
def quick(tmp_path: Path) -> Iterator[Sandbox]:
    """A sandbox whose messages come back one second after they were received."""
    with Sandbox(tmp_path / "sandbox", cmq_visibility_timeout=1.0).start() as sandbox:
        yield sandbox


# --- the signature -----------------------------------------------------------------------------


def test_the_documented_signature_example_reproduces() -> None:
    text = string_to_sign("POST", DOC_HOST, PATH, DOC_PARAMS)
    assert text.startswith(f"POST{DOC_HOST}/v2/index.php?Action=SendMessage&Nonce=2889712707386595659&")
    assert sign(DOC_KEY, text, "HmacSHA1") == DOC_SIGNATURE
    # The sandbox checks signatures with code of its own: the same example passes there, and only it.
    assert verify_signature(DOC_KEY, "POST", DOC_HOST, DOC_PARAMS | {"Signature": DOC_SIGNATURE})
    assert not verify_signature(DOC_KEY, "POST", DOC_HOST, DOC_PARAMS | {"msgBody": "msg2", "Signature": DOC_SIGNATURE})
    assert not verify_signature(DOC_KEY, "POST", "other.host", DOC_PARAMS | {"Signature": DOC_SIGNATURE})


def test_keys_with_underscores_are_signed_with_dots_and_the_host_keeps_only_a_port_of_its_own() -> None:
    assert string_to_sign("post", "h", "/p", {"b_c": "1", "a": "x y", "Signature": "s"}) == "POSTh/p?a=x y&b.c=1"
    assert host_of("https://cmq-gz.public.tencenttdmq.com/") == "cmq-gz.public.tencenttdmq.com"
    assert host_of("https://h:443") == "h"
    assert host_of("http://127.0.0.1:9000") == "127.0.0.1:9000"
    with pytest.raises(ValueError, match="HmacSHA1 or HmacSHA256"):
        sign("k", "t", "MD5")


@pytest.mark.parametrize("method", ["HmacSHA1", "HmacSHA256"])
def test_the_sandbox_takes_either_signature_method(sandbox: Sandbox, method: str) -> None:
    cmq = CmqClient(sandbox.url, sandbox.secret_id, sandbox.secret_key, signature_method=method)
    assert cmq.send(QUEUE, "hello")
    assert [m.body for m in cmq.receive(QUEUE, 16, 0)] == ["hello"]


def test_a_wrong_key_or_an_old_timestamp_is_refused_for_good(sandbox: Sandbox) -> None:
    with pytest.raises(CmqError) as refused:
        CmqClient(sandbox.url, sandbox.secret_id, "not-the-key").receive(QUEUE, 1, 0)
    assert (refused.value.code, refused.value.fatal) == (4100, True)
    cmq = client(sandbox)
    old = cmq.signed("BatchReceiveMessage", {"queueName": QUEUE, "numOfMsg": "1"}, nonce=1, timestamp=1534154812)
    answer = requests.post(sandbox.url + PATH, data=old, timeout=10).json()
    assert answer["code"] == 4100
    assert "five minutes" in answer["message"]


# --- the queue -----------------------------------------------------------------------------------


@pytest.mark.slow  # waits out a visibility timeout
def test_a_received_message_is_hidden_then_comes_back_with_a_new_handle(quick: Sandbox) -> None:
    cmq = client(quick)
    msg_id = cmq.send(QUEUE, "once")
    [first] = cmq.receive(QUEUE, 16, 0)
    assert (first.msg_id, first.body) == (msg_id, "once")
    assert first.next_visible_time >= first.enqueue_time
    assert cmq.receive(QUEUE, 16, 0) == []  # invisible until its visibility timeout
    [again] = cmq.receive(QUEUE, 16, 3)  # long polling outlasts it
    assert again.msg_id == msg_id
    assert again.receipt_handle != first.receipt_handle
    [stale] = cmq.delete(QUEUE, [first.receipt_handle])  # only the latest handle deletes it
    assert (stale.receipt_handle, stale.code) == (first.receipt_handle, 4430)
    assert quick.cmq.pending(QUEUE) == 1
    assert cmq.delete(QUEUE, [again.receipt_handle]) == []
    assert quick.cmq.pending(QUEUE) == 0


def test_a_batch_delete_reports_each_handle_that_failed(quick: Sandbox) -> None:
    cmq = client(quick)
    for n in range(3):
        cmq.send(QUEUE, f"m{n}")
    handles = [m.receipt_handle for m in cmq.receive(QUEUE, 16, 0)]
    some = cmq.delete(QUEUE, [handles[0], "no-such-handle"])  # 6010: one of two failed
    assert [(f.receipt_handle, f.code) for f in some] == [("no-such-handle", 4430)]
    every = cmq.delete(QUEUE, ["x", "y"])  # 6020: all failed
    assert [f.receipt_handle for f in every] == ["x", "y"]
    assert cmq.delete(QUEUE, handles[1:]) == []


@pytest.mark.slow  # long polls wait out their time
def test_long_polling_waits_for_a_message_or_for_its_wait(sandbox: Sandbox) -> None:
    cmq = client(sandbox)
    threading.Timer(0.3, cmq.send, (QUEUE, "late")).start()
    started = time.monotonic()
    assert [m.body for m in cmq.receive(QUEUE, 16, 10)] == ["late"]
    assert time.monotonic() - started < 5
    started = time.monotonic()
    assert cmq.receive("empty-queue", 16, 1) == []  # code 7000 is no error
    assert 0.9 < time.monotonic() - started < 5


def test_parameters_are_checked(sandbox: Sandbox) -> None:
    cmq = client(sandbox)

    def code(action: str, **params: str) -> int:
        with pytest.raises(CmqError) as refused:
            cmq.call(action, params)
        return refused.value.code

    assert code("BatchReceiveMessage", queueName="1starts-with-a-digit", numOfMsg="1") == 4000
    assert code("BatchReceiveMessage", queueName=QUEUE, numOfMsg="17") == 4000
    assert code("BatchReceiveMessage", queueName=QUEUE, numOfMsg="1", pollingWaitSeconds="31") == 4000
    assert code("BatchDeleteMessage", queueName=QUEUE, **{"receiptHandle.1": "a", "receiptHandle.3": "b"}) == 4000
    assert code("SendMessage", queueName=QUEUE, msgBody="") == 4400
    assert code("PurgeQueue", queueName=QUEUE) == 4000
    # Handles numbered from 0 are as good as from 1.
    cmq.send(QUEUE, "m")
    [message] = cmq.receive(QUEUE, 16, 0)
    cmq.call("BatchDeleteMessage", {"queueName": QUEUE, "receiptHandle.0": message.receipt_handle})
    assert sandbox.cmq.pending(QUEUE) == 0


def test_faults_make_chosen_actions_fail(sandbox: Sandbox) -> None:
    cmq = client(sandbox)
    cmq.send(QUEUE, "m")
    sandbox.cmq.add_fault(CmqFault(action="BatchReceiveMessage", status=503, times=1))
    sandbox.cmq.add_fault(CmqFault(action="BatchReceiveMessage", code=4420, times=1))
    sandbox.cmq.add_fault(CmqFault(action="BatchReceiveMessage", queue=QUEUE, code=4440, times=1))
    for status, code, fatal in ((503, -1, False), (200, 4420, False), (200, 4440, True)):
        with pytest.raises(CmqError) as failed:
            cmq.receive(QUEUE, 16, 0)
        assert (failed.value.status, failed.value.code, failed.value.fatal) == (status, code, fatal)
    sandbox.cmq.add_fault(CmqFault(action="BatchDeleteMessage", drop_reply=True, times=1))
    [message] = cmq.receive(QUEUE, 16, 0)
    with pytest.raises(CmqError) as dropped:
        cmq.delete(QUEUE, [message.receipt_handle])
    assert (dropped.value.code, dropped.value.fatal) == (-1, False)
    assert sandbox.cmq.pending(QUEUE) == 0  # the delete happened; only its reply was lost
    sandbox.cmq.add_fault(CmqFault(action="SendMessage", delay=0.5, times=1))
    started = time.monotonic()
    cmq.send(QUEUE, "slow")
    assert time.monotonic() - started >= 0.5
    with pytest.raises(ValueError, match="exclude each other"):
        CmqFault(code=4420, drop_reply=True)


def test_faults_are_set_over_http_on_a_running_sandbox(sandbox: Sandbox) -> None:
    url = sandbox.url + "/_sandbox/cmq/faults"
    added = requests.post(url, json={"action": "BatchDeleteMessage", "drop_reply": True, "rate": 0.3}, timeout=5)
    assert added.status_code == 200
    assert added.json()["faults"][0] | {"fired": 0} == {
        "action": "BatchDeleteMessage",
        "queue": None,
        "times": None,
        "rate": 0.3,
        "seed": 0,
        "status": None,
        "code": None,
        "delay": 0.0,
        "drop_reply": True,
        "fired": 0,
    }
    assert requests.post(url, json={"action": "Nope", "code": 1}, timeout=5).status_code == 400
    assert requests.post(url, json={"bogus": 1}, timeout=5).status_code == 400
    assert requests.delete(url, timeout=5).json() == {"faults": []}


def test_an_object_named_like_the_cmq_path_is_still_an_object(sandbox: Sandbox) -> None:
    sandbox.client(REGION).put_object(Bucket=BUCKET, Key="v2/index.php", Body=b"<?php")
    body = sandbox.client(REGION).get_object(Bucket=BUCKET, Key="v2/index.php")["Body"].get_raw_stream().read()
    assert body == b"<?php"


# --- what the client makes of answers (pure) ---------------------------------------------------


def test_answers_and_their_errors() -> None:
    assert _answer("A", 200, '{"code": 0, "message": "", "requestId": "r"}')["requestId"] == "r"
    for status, text, code in ((502, "<html>", -1), (200, "not json", -1), (200, '{"x": 1}', -1)):
        with pytest.raises(CmqError) as failed:
            _answer("A", status, text)
        assert failed.value.code == code
        assert not failed.value.fatal
    with pytest.raises(CmqError) as gateway:
        _answer("A", 404, "no such path")
    assert gateway.value.fatal  # a wrong endpoint answers the same again
    partial = '{"code": 6010, "message": "m", "errorList": [{"code": 4430, "message": "x", "receiptHandle": "h"}]}'
    with pytest.raises(CmqError) as deleted:
        _answer("BatchDeleteMessage", 200, partial)
    assert [(f.receipt_handle, f.code) for f in deleted.value.failures] == [("h", 4430)]
    with pytest.raises(CmqError, match="msgId or receiptHandle"):
        parse_messages({"msgInfoList": [{"msgBody": "b"}]})
    [message] = parse_messages(
        {"msgInfoList": [{"msgId": "1", "receiptHandle": "h", "msgBody": "b", "dequeueCount": "2"}]}
    )
    assert (message.body, message.dequeue_count, message.enqueue_time) == ("b", 2, 0)


def test_what_stops_the_consumer_is_explained() -> None:
    auth = explain(CmqError("BatchReceiveMessage", 4100, "auth failed"), "q", "https://cmq-gz.public.tencenttdmq.com")
    assert "TDMQ_SECRET_ID" in auth
    assert "tdmq:BatchReceiveMessage and tdmq:BatchDeleteMessage on queue q" in auth
    missing = explain(CmqError("BatchReceiveMessage", 4440, "no queue"), "q", "e")
    assert "has no queue q" in missing
    assert "WEBHOOK_TDMQ_QUEUE" in missing


def test_credentials_fall_back_to_the_cos_keys_and_the_region_s_endpoint() -> None:
    cos = {"secret_id": "cos-id", "secret_key": "cos-key"}
    found = credentials(Settings(tdmq_queues=("q",), tdmq_region="sh", **cos))
    assert found.endpoint == "https://cmq-sh.public.tencenttdmq.com"
    assert (found.secret_id, found.secret_key) == ("cos-id", "cos-key")
    own = credentials(
        Settings(
            tdmq_queues=("q",),
            tdmq_endpoint="http://sh.mqadapter.cmq.tencentyun.com/",
            tdmq_secret_id="mq-id",
            tdmq_secret_key="mq-key",
            **cos,
        )
    )
    assert (own.endpoint, own.secret_id, own.secret_key) == (
        "http://sh.mqadapter.cmq.tencentyun.com",
        "mq-id",
        "mq-key",
    )
    with pytest.raises(ConfigError, match="WEBHOOK_TDMQ_QUEUE is not set"):
        credentials(Settings(tdmq_region="sh", **cos))
    with pytest.raises(ConfigError, match="WEBHOOK_TDMQ_REGION is not set"):
        credentials(Settings(tdmq_queues=("q",), **cos))
    with pytest.raises(ConfigError, match=r"short region name .* not 'ap-guangzhou'"):
        credentials(Settings(tdmq_queues=("q",), tdmq_region="ap-guangzhou", **cos))
    with pytest.raises(ConfigError, match="TDMQ_SECRET_ID and TDMQ_SECRET_KEY are not set"):
        credentials(Settings(tdmq_queues=("q",), tdmq_region="sh"))
    assert mq_config("gz", "q") == {"MqRegion": "gz", "MqMode": "Queue", "MqName": "q"}
    with pytest.raises(ConfigError, match="must be one of sh, bj, gz, cd, hk"):
        mq_config("sg", "q")


# --- reading a message (pure) ------------------------------------------------------------------


def test_a_message_is_read_as_the_callback_it_carries_whatever_its_wrapping() -> None:
    document = forged_document("j1")
    for text, encoding in (
        (as_json(document), "text"),
        (as_xml(document), "text"),
        ("\n  " + as_json(document), "text"),
        (base64.b64encode(as_json(document).encode()).decode(), "base64"),
        (base64.encodebytes(as_xml(document).encode()).decode(), "base64"),  # with line breaks
    ):
        read = read_message(text)
        assert read.encoding == encoding
        assert [job.job_id for job in read.callback.jobs] == ["j1"]
    for text, reason in (
        ("", "the message body is empty"),
        ("hello, world", "neither XML, JSON nor base64"),
        (base64.b64encode(b"plain words").decode(), "base64, but not of an XML or JSON document"),
        ('{"EventName": "TaskFinish"}', "missing JobsDetail"),
        ("<Response><EventName>TaskFinish</EventName>", "malformed XML"),
        (base64.b64encode(b"{broken").decode(), "base64 of a document that is not readable: malformed JSON"),
    ):
        with pytest.raises(Unreadable, match=reason):
            read_message(text)


# --- the CI side ------------------------------------------------------------------------------


@pytest.mark.parametrize("callback_format", ["JSON", "XML"])
def test_a_tdmq_job_puts_the_callback_document_on_its_queue(
    sandbox: Sandbox, tmp_path: Path, callback_format: str
) -> None:
    noisy_wav(tmp_path / "in.wav", 0.1)
    sandbox.client(REGION).put_object(Bucket=BUCKET, Key="in/a.wav", Body=(tmp_path / "in.wav").read_bytes())
    job_id = submit_with_tdmq(sandbox, "in/a.wav", "out/a.wav", callback_format)
    [sent] = sandbox.wait_for_callbacks(1, timeout=20)
    assert (sent.job_id, sent.url, sent.format, sent.status_code) == (
        job_id,
        f"tdmq://gz/{QUEUE}",
        callback_format.lower(),
        200,
    )
    [message] = client(sandbox).receive(QUEUE, 16, 5)
    assert message.body.encode() == sent.body  # the document a URL callback would have POSTed
    read = read_message(message.body)
    assert read.callback.body_format == callback_format.lower()
    assert read.callback.jobs[0].state == "Success"
    if callback_format == "JSON":
        assert json.loads(message.body)["JobsDetail"]["JobId"] == job_id


def test_a_queue_notifying_through_tdmq_calls_back_for_jobs_without_a_callback(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    ci = sandbox.client(REGION)
    [queue] = ci.ci_get_asr_queue(Bucket=BUCKET)["QueueList"]
    notify = {"State": "On", "Type": "TDMQ", "Event": "TaskFinish", "ResultFormat": "XML", **MQ}
    request = {"Name": "q", "State": "Active", "NotifyConfig": notify}
    ci.ci_update_asr_queue(Bucket=BUCKET, QueueId=queue["QueueId"], Request=request)
    [after] = ci.ci_get_asr_queue(Bucket=BUCKET)["QueueList"]
    assert {name: after["NotifyConfig"][name] for name in notify} == notify
    noisy_wav(tmp_path / "in.wav", 0.1)
    ci.put_object(Bucket=BUCKET, Key="in/a.wav", Body=(tmp_path / "in.wav").read_bytes())
    job_id = submit_noise_reduction(ci, "in/a.wav", ObjectLocation(BUCKET, REGION, "out/a.wav"), "", None)
    [sent] = sandbox.wait_for_callbacks(1, timeout=20)
    assert (sent.job_id, sent.url, sent.format) == (job_id, f"tdmq://gz/{QUEUE}", "xml")
    [message] = client(sandbox).receive(QUEUE, 16, 5)
    assert read_message(message.body).callback.jobs[0].job_id == job_id


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ("<MqRegion>gz</MqRegion><MqMode>Topic</MqMode><MqName>t</MqName>", "queues only"),
        ("<MqRegion>gz</MqRegion><MqMode>Queue</MqMode>", "MqName is required"),
        ("<MqRegion>sg</MqRegion><MqName>q</MqName>", "MqRegion must be one of"),
        ("", "MqRegion must be one of"),
    ],
)
def test_a_tdmq_callback_needs_a_queue_the_sandbox_can_deliver_to(config: str, problem: str) -> None:
    body = (
        "<Request><Tag>NoiseReduction</Tag><Input><Object>a.wav</Object></Input><Operation><Output><Region>gz"
        "</Region><Bucket>b-1250000000</Bucket><Object>o.wav</Object></Output></Operation>"
        f"<CallBackType>TDMQ</CallBackType><CallBackMqConfig>{config}</CallBackMqConfig></Request>"
    ).encode()
    with pytest.raises(JobRequestError, match=problem):
        new_job(body, bucket=BUCKET, region=REGION, queue_id="p1")
