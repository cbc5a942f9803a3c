"""The SDK's errors as the worker records and logs them: one line with the code, the message and the request id.

The SDK keeps COS's and CI's whole XML error body in its exceptions; these reach the ledger and
the logs only reduced.
"""

from __future__ import annotations

import pytest
from qcloud_cos.cos_exception import CosClientError, CosServiceError

from webhook.ci.client import client_error, make_client, service_error
from webhook.ci.fetch import FetchError, describe_object
from webhook.ci.verify import VerifyError, describe_job
from webhook.config_values import CosEndpoint
from webhook.dev.sandbox import Sandbox
from webhook.models import ObjectLocation

BUCKET, REGION = "audio-1250000000", "ap-guangzhou"
REQUEST_ID = r"\(request_id=[0-9a-f]{32}\)$"  # the sandbox's, as COS names each answer


def test_describe_job_with_a_wrong_key_reports_code_message_and_request_id(sandbox: Sandbox) -> None:
    client = make_client(sandbox.secret_id, "not-the-key", REGION, sandbox.endpoint)
    with pytest.raises(VerifyError) as refused:
        describe_job(client, BUCKET, "j" + "0" * 32)
    assert refused.match(
        r"^CI answered 403 SignatureDoesNotMatch: the request signature does not match the one calculated " + REQUEST_ID
    )


def test_head_without_a_body_still_reports_the_request_id(sandbox: Sandbox) -> None:
    # A HEAD answer has no body: the SDK makes up the code and message and keeps COS's request id header.
    with pytest.raises(FetchError) as missing:
        describe_object(sandbox.client(REGION), ObjectLocation(BUCKET, REGION, "out/none.wav"))
    assert missing.match(
        r"^COS answered 404 NoSuchResource for out/none\.wav: The Resource You Head Not Exist " + REQUEST_ID
    )


def test_body_the_sdk_cannot_digest_is_read_for_its_fields() -> None:
    # CI's error bodies have no <Resource>, which the SDK's digest needs; it then keeps only the raw text.
    body = (
        "<?xml version='1.0' encoding='utf-8' ?>\n<Response>\n  <Code>InvalidParameter</Code>\n"
        "  <Message>JobIDs is invalid</Message>\n  <RequestId>NjVhYjEwOTVf</RequestId>\n</Response>\n"
    )
    exc = CosServiceError("GET", body, 400)
    assert exc.get_error_code() == "Unknown"  # what the SDK itself can tell
    assert service_error(exc) == ("400 InvalidParameter", "JobIDs is invalid (request_id=NjVhYjEwOTVf)")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n</html>", ("502 Unknown", "(request_id=unknown)")),
        (
            "<Error><Code>Slow\nDown</Code><Message>first\r\nsecond</Message><Resource>r</Resource>"
            "<RequestId>id-1\n2026-01-01 forged</RequestId></Error>",
            ("502 Slow", "first (request_id=id-1)"),
        ),
    ],
    ids=["not-xml", "multi-line-fields"],
)
def test_every_part_is_one_line(body: str, expected: tuple[str, str]) -> None:
    assert service_error(CosServiceError("GET", body, 502)) == expected


def test_client_error_keeps_its_first_line() -> None:
    assert client_error(CosClientError("Read timed out.\n<Error>\n  <Code>x</Code>\n</Error>")) == "Read timed out."
    assert client_error(CosClientError("x" * 400)) == "x" * 300 + "…"


@pytest.mark.slow  # the SDK waits a second before its retry
def test_unreachable_ci_is_one_line() -> None:
    client = make_client("id", "key", REGION, CosEndpoint("http", "127.0.0.1", 9))
    with pytest.raises(VerifyError, match=r"^CI API unreachable: [^\n]*Connection refused[^\n]*$"):
        describe_job(client, BUCKET, "j" + "0" * 32)
