"""Hostile callback bodies over real sockets: never a 5xx, never a half-stored job.

GUNICORN_TIMEOUT only restarts a worker whose heartbeat stops, so it never cuts off a slow sender:
that protection has to come from a proxy in front of gunicorn.
"""

from __future__ import annotations

import json
import re
import resource
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
import requests
import sqlalchemy as sa
from support.endpoint import NOTHING, TOKEN, post, row_counts, serving
from support.processes import wait_healthy, web
from support.samples import DOC_JSON, DOC_XML, JOB_ID, body, job, operation

import webhook.intake.callback
from webhook.config import Settings
from webhook.intake.callback import MAX_XML_DEPTH, CallbackError, parse_callback
from webhook.ledger import Ledger
from webhook.ledger.schema import callbacks
from webhook.models import Job

DEFAULT_LIMIT = Settings().max_body_bytes
ONE_JOB = {"callbacks": 1, "jobs": 1, "job_versions": 1, "tasks": 1}
DTD_REFUSED = "XML with a DOCTYPE or entity declaration is not accepted"
MiB = 1024 * 1024


# -- helpers --------------------------------------------------------------------------------------


@pytest.fixture
def base_url(ledger: Ledger) -> Iterator[str]:
    with serving(ledger) as url:
        yield url


def stored(ledger: Ledger) -> tuple[bytes, str]:
    """The one stored callback's raw body and Content-Type."""
    with ledger.engine.connect() as conn:
        [row] = conn.execute(sa.select(callbacks.c.body, callbacks.c.content_type))
    return bytes(row.body), row.content_type


def assert_error(response: requests.Response, status: int, message: str) -> None:
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"error": message, "status": status}


def assert_stored_doc_job(response: requests.Response, ledger: Ledger) -> None:
    assert response.status_code == 200, response.text
    assert response.json()["jobs"] == [{"job_id": JOB_ID, "duplicate": False}]
    assert row_counts(ledger) == ONE_JOB


def connect(base: str) -> socket.socket:
    """A raw client socket; the timeout only keeps a broken server from hanging the test."""
    url = urlsplit(base)
    return socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout=30)


def request_head(content_length: int | None = None, *, chunked: bool = False, extra: bytes = b"") -> bytes:
    head = b"POST /callback/" + TOKEN.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra
    if content_length is not None:
        head += b"Content-Length: %d\r\n" % content_length
    if chunked:
        head += b"Transfer-Encoding: chunked\r\n"
    return head + b"\r\n"


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one response, read by its Content-Length (not until EOF)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a complete response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of the response body"
        rest += chunk
    return int(status_line.split()[1]), headers, rest[:length]


def assert_raw_error(answer: tuple[int, dict[str, str], bytes], status: int, message: str) -> None:
    got_status, headers, payload = answer
    assert got_status == status
    assert headers["content-type"] == "application/json"
    assert json.loads(payload) == {"error": message, "status": status}


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# -- XML bombs: refused before anything is expanded or fetched ---------------------------------------


@pytest.fixture
def tripwire() -> Iterator[int]:
    """A port that nothing should ever connect to: external entities and DTDs point here."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        yield listener.getsockname()[1]
        # A parser that fetched synchronously would have connected before answering.
        with pytest.raises(BlockingIOError):
            listener.accept()


def _laughs(levels: int) -> bytes:
    entities = '<!ENTITY lol0 "lol">' + "".join(
        f'<!ENTITY lol{n} "{f"&lol{n - 1};" * 10}">' for n in range(1, levels + 1)
    )
    return (
        f'<?xml version="1.0"?><!DOCTYPE Response [{entities}]>'
        f"<Response><EventName>&lol{levels};</EventName></Response>"
    ).encode()


def _quadratic() -> bytes:
    # 10,000 references to a 50 kB entity: a 130 kB body that expands to 500 MB.
    return (
        b'<?xml version="1.0"?><!DOCTYPE Response [<!ENTITY a "' + b"x" * 50_000 + b'">]>'
        b"<Response><EventName>TaskFinish</EventName><JobsDetail><Message>"
        + b"&a;" * 10_000
        + b"</Message></JobsDetail></Response>"
    )


def _bombs(port: int) -> dict[str, bytes]:
    url = f"http://127.0.0.1:{port}"
    return {
        "billion-laughs": _laughs(10),  # 10^10 "lol"s
        "quadratic-blowup": _quadratic(),
        "external-entity-file": (
            b'<?xml version="1.0"?><!DOCTYPE Response [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
            b"<Response><EventName>TaskFinish</EventName><JobsDetail><JobId>&xxe;</JobId></JobsDetail></Response>"
        ),
        "external-entity-http": (
            f'<!DOCTYPE Response [<!ENTITY xxe SYSTEM "{url}/x">]><Response><EventName>&xxe;</EventName></Response>'
        ).encode(),
        "external-parameter-entity": (
            f'<!DOCTYPE Response [<!ENTITY % ext SYSTEM "{url}/p.dtd"> %ext;]>'
            "<Response><EventName>TaskFinish</EventName></Response>"
        ).encode(),
        "internal-parameter-entity": (
            b"<!DOCTYPE Response [<!ENTITY % decl \"<!ENTITY e 'boom'>\"> %decl;]>"
            b"<Response><EventName>&e;</EventName></Response>"
        ),
        "external-dtd-system": (
            f'<!DOCTYPE Response SYSTEM "{url}/evil.dtd"><Response><EventName>TaskFinish</EventName></Response>'
        ).encode(),
        "external-dtd-public": (
            f'<!DOCTYPE Response PUBLIC "-//Evil//DTD//EN" "{url}/evil.dtd">'
            "<Response><EventName>TaskFinish</EventName></Response>"
        ).encode(),
        "doctype-after-bom-declaration-comment-and-pi": (
            b'\xef\xbb\xbf\r\n<?xml version="1.0" encoding="UTF-8"?><!-- CI --><?pi x?>\n'
            + f'<!DOCTYPE Response SYSTEM "{url}/evil.dtd">'.encode()
            + DOC_XML
        ),
    }


BOMB_IDS = list(_bombs(9))


@pytest.mark.parametrize("name", BOMB_IDS)
def test_xml_bomb_is_refused_400_before_expansion(ledger: Ledger, base_url: str, tripwire: int, name: str) -> None:
    sent = _bombs(tripwire)[name]
    rss_before, peak_before = rss(), peak_rss()

    response = post(base_url, sent, "application/xml")

    assert_error(response, 400, DTD_REFUSED)
    assert row_counts(ledger) == NOTHING
    # Expanded, these would take from hundreds of megabytes to gigabytes.
    assert rss() - rss_before < 50 * MiB
    assert peak_rss() - peak_before < 50 * MiB


@pytest.mark.parametrize("name", BOMB_IDS)
def test_xml_bomb_is_refused_by_the_parser_even_if_the_text_check_misses_it(
    monkeypatch: pytest.MonkeyPatch, tripwire: int, name: str
) -> None:
    # Belt and braces: with the pattern check disabled, expat's own DOCTYPE handler still refuses it.
    monkeypatch.setattr(webhook.intake.callback, "_DTD", re.compile(r"(?!)"))
    peak_before = peak_rss()

    with pytest.raises(CallbackError) as raised:
        parse_callback(_bombs(tripwire)[name])

    assert (raised.value.status, raised.value.message) == (400, DTD_REFUSED)
    assert peak_rss() - peak_before < 50 * MiB


# -- deep nesting ---------------------------------------------------------------------------------------

DEEP = 100_000


def _deep_xml_in_job(levels: int) -> bytes:
    # Response (1) / JobsDetail (2) / <a> x levels: unknown elements, ignored if accepted.
    return DOC_XML.replace(b"</JobsDetail>", b"<a>" * levels + b"deep" + b"</a>" * levels + b"</JobsDetail>")


def _deep_json_in_job(opening: bytes, closing: bytes) -> bytes:
    return DOC_JSON.replace(b'"Tag":"NoiseReduction"', b'"Tag":"NoiseReduction","X":' + opening * DEEP + closing * DEEP)


@pytest.mark.parametrize(
    ("sent", "message"),
    [
        pytest.param(b"[" * DEEP, "JSON is nested too deeply", id="json-unclosed-arrays"),
        pytest.param(b'{"a":' * DEEP, "JSON is nested too deeply", id="json-unclosed-objects"),
        pytest.param(_deep_json_in_job(b"[", b"]"), "JSON is nested too deeply", id="json-arrays-in-a-valid-job"),
        pytest.param(_deep_json_in_job(b'{"a":', b"}"), "JSON is nested too deeply", id="json-objects-in-a-valid-job"),
        pytest.param(
            _deep_xml_in_job(DEEP), f"XML is nested more than {MAX_XML_DEPTH} elements deep", id="xml-in-a-valid-job"
        ),
        pytest.param(
            b"<Response>" + b"<a>" * DEEP, f"XML is nested more than {MAX_XML_DEPTH} elements deep", id="xml-unclosed"
        ),
        pytest.param(
            b"<Response><EventName>TaskFinish</EventName>" + b"<JobsDetail>" * 40_000 + b"</JobsDetail>" * 40_000,
            f"XML is nested more than {MAX_XML_DEPTH} elements deep",
            id="xml-nested-jobsdetail",
        ),
        pytest.param(
            _deep_xml_in_job(MAX_XML_DEPTH - 1),
            f"XML is nested more than {MAX_XML_DEPTH} elements deep",
            id="xml-one-level-over-the-limit",
        ),
    ],
)
def test_deeply_nested_body_is_refused_400(ledger: Ledger, base_url: str, sent: bytes, message: str) -> None:
    assert len(sent) <= DEFAULT_LIMIT

    assert_error(post(base_url, sent), 400, message)
    assert row_counts(ledger) == NOTHING


def test_xml_nested_exactly_to_the_limit_is_accepted(ledger: Ledger, base_url: str) -> None:
    sent = _deep_xml_in_job(MAX_XML_DEPTH - 2)

    assert_stored_doc_job(post(base_url, sent), ledger)
    assert ledger.views.show_job(JOB_ID).job == parse_callback(DOC_XML).jobs[0]


# -- 100,000 jobs in one callback -----------------------------------------------------------------------

MANY = 100_000
MANY_JSON = (
    b'{"EventName":"TaskFinish","JobsDetail":[' + b",".join(b'{"JobId":"j%06d"}' % n for n in range(MANY)) + b"]}"
)
MANY_XML = (
    b"<Response><EventName>TaskFinish</EventName>"
    + b"".join(b"<JobsDetail><JobId>j%06d</JobId></JobsDetail>" % n for n in range(MANY))
    + b"</Response>"
)
MANY_REFUSED = f"JobsDetail has {MANY} jobs; at most 100 are accepted"


@pytest.mark.parametrize("sent", [MANY_JSON, MANY_XML], ids=["json", "xml"])
def test_100k_jobs_are_refused_400_when_the_body_limit_allows_them(ledger: Ledger, sent: bytes) -> None:
    assert DEFAULT_LIMIT < len(sent) < 8 * MiB

    with serving(ledger, max_body_bytes=8 * MiB) as url:
        response = post(url, sent)

    assert_error(response, 400, MANY_REFUSED)
    assert row_counts(ledger) == NOTHING


@pytest.mark.parametrize("sent", [MANY_JSON, MANY_XML], ids=["json", "xml"])
def test_100k_jobs_are_refused_413_under_the_default_limit(ledger: Ledger, base_url: str, sent: bytes) -> None:
    assert_error(post(base_url, sent), 413, f"body is larger than {DEFAULT_LIMIT} bytes")
    assert row_counts(ledger) == NOTHING


@pytest.mark.parametrize("sent", [MANY_JSON, MANY_XML], ids=["json", "xml"])
def test_job_count_is_checked_before_any_job_is_normalized(monkeypatch: pytest.MonkeyPatch, sent: bytes) -> None:
    normalized: list[str] = []
    real_parse_job = webhook.intake.callback.parse_job

    def counting_parse_job(item: Any, where: str) -> Job:
        normalized.append(where)
        return real_parse_job(item, where)

    monkeypatch.setattr(webhook.intake.callback, "parse_job", counting_parse_job)

    with pytest.raises(CallbackError) as raised:
        parse_callback(sent)

    assert raised.value.message == MANY_REFUSED
    assert normalized == []


# -- encodings ---------------------------------------------------------------------------------------------

_OPEN = b'{"EventName": "'  # 15 bytes: the bad sequence starts at byte 15


@pytest.mark.parametrize(
    ("sent", "message"),
    [
        pytest.param(_OPEN + b'\x80"}', "body is not valid UTF-8 (byte 15)", id="lone-continuation-byte"),
        pytest.param(_OPEN + b'\xc0\xaf"}', "body is not valid UTF-8 (byte 15)", id="overlong-2-byte-slash"),
        pytest.param(_OPEN + b'\xe0\x80\xaf"}', "body is not valid UTF-8 (byte 15)", id="overlong-3-byte-slash"),
        pytest.param(_OPEN + b'\xf0\x80\x80\xaf"}', "body is not valid UTF-8 (byte 15)", id="overlong-4-byte-slash"),
        pytest.param(_OPEN + b'\xed\xa0\x80"}', "body is not valid UTF-8 (byte 15)", id="encoded-surrogate-half"),
        pytest.param(_OPEN + b'\xf4\x90\x80\x80"}', "body is not valid UTF-8 (byte 15)", id="above-U+10FFFF"),
        pytest.param(_OPEN + b'\xf8\x88\x80\x80\x80"}', "body is not valid UTF-8 (byte 15)", id="5-byte-form"),
        pytest.param(_OPEN + b'\xe4\xbd"}', "body is not valid UTF-8 (byte 15)", id="truncated-multibyte-inside"),
        pytest.param(
            DOC_JSON + b"\xe4\xbd", f"body is not valid UTF-8 (byte {len(DOC_JSON)})", id="truncated-multibyte-at-end"
        ),
        pytest.param(
            DOC_XML.replace(b"SUCCESS", b"SUC\xffCESS"),
            f"body is not valid UTF-8 (byte {DOC_XML.index(b'SUCCESS') + 3})",
            id="xml-with-ff-byte",
        ),
        pytest.param(DOC_XML.decode().encode("utf-16"), "body is not valid UTF-8 (byte 0)", id="xml-utf16-bom"),
        pytest.param(DOC_JSON.decode().encode("utf-16-be"), "body contains a NUL byte (byte 0)", id="json-utf16be"),
        pytest.param(
            b"\xfe\xff" + DOC_JSON.decode().encode("utf-16-be"),
            "body is not valid UTF-8 (byte 0)",
            id="json-utf16be-bom",
        ),
        pytest.param(DOC_XML.decode().encode("utf-32"), "body is not valid UTF-8 (byte 0)", id="xml-utf32-bom"),
        # Expat reads "<\0R\0..." as UTF-16 whatever it is told: only the NUL check stops these.
        pytest.param(DOC_XML.decode().encode("utf-16-le"), "body contains a NUL byte (byte 1)", id="xml-utf16le"),
        pytest.param(
            b'<!DOCTYPE Response SYSTEM "http://127.0.0.1:9/x"><Response><EventName>X</EventName></Response>'.decode().encode(
                "utf-16-le"
            ),
            "body contains a NUL byte (byte 1)",
            id="xml-utf16le-with-external-dtd",
        ),
        pytest.param(
            _laughs(3).decode().encode("utf-16-le"), "body contains a NUL byte (byte 1)", id="xml-utf16le-bomb"
        ),
        pytest.param(
            DOC_JSON.replace(b"SUCCESS", b"SUC\x00CESS"),
            f"body contains a NUL byte (byte {DOC_JSON.index(b'SUCCESS') + 3})",
            id="raw-nul",
        ),
    ],
)
def test_body_that_is_not_utf8_is_refused_400(ledger: Ledger, base_url: str, sent: bytes, message: str) -> None:
    assert_error(post(base_url, sent), 400, message)
    assert row_counts(ledger) == NOTHING


@pytest.mark.parametrize(
    "declaration",
    [
        b'<?xml version="1.0" encoding="UTF-8"?>',
        b"<?xml version='1.0' encoding='utf-8' standalone='yes'?>\r\n",
        b'<?xml version="1.0"?>\n',
    ],
    ids=["utf-8", "single-quoted-standalone", "no-encoding"],
)
def test_utf8_bom_then_xml_declaration_is_accepted(ledger: Ledger, base_url: str, declaration: bytes) -> None:
    sent = b"\xef\xbb\xbf" + declaration + DOC_XML

    assert_stored_doc_job(post(base_url, sent, "application/xml"), ledger)
    assert stored(ledger)[0] == sent


@pytest.mark.parametrize("declared", ["ISO-8859-1", "UTF-16", "Shift_JIS", "no-such-encoding"])
def test_declared_xml_encoding_is_ignored_the_body_is_read_as_utf8(
    ledger: Ledger, base_url: str, declared: str
) -> None:
    sent = f'<?xml version="1.0" encoding="{declared}"?>'.encode() + body("xml", job(Message="降噪完成 é"))

    assert_stored_doc_job(post(base_url, sent), ledger)
    assert ledger.views.show_job(JOB_ID).job.message == "降噪完成 é"


def ascii_json(detail: dict[str, Any], event: str = "TaskFinish") -> bytes:
    """JSON with every non-ASCII character escaped, so a lone surrogate becomes "\\udXXX"."""
    doc: dict[str, Any] = {"EventName": event}
    if detail:
        doc["JobsDetail"] = detail
    return json.dumps(doc).encode()


# -- strings the databases cannot store --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "message"),
    [
        pytest.param(ascii_json({}, event="\ud800"), "EventName contains an unpaired surrogate", id="event-name"),
        pytest.param(ascii_json(job(Tag="Noise\udc00")), "JobsDetail[0].Tag contains an unpaired surrogate", id="tag"),
        pytest.param(
            ascii_json(job(Message="\ude00\ud83d")),
            "JobsDetail[0].Message contains an unpaired surrogate",
            id="pair-in-the-wrong-order",
        ),
        pytest.param(
            ascii_json(job(Input={"BucketId": "b-1", "Object": "in/\udbff.wav"})),
            "JobsDetail[0].Input.Object contains an unpaired surrogate",
            id="object-key",
        ),
        pytest.param(
            ascii_json(job(Input={"CosHeaders": [{"Key": "x-cos-meta-\udfff", "Value": "1"}]})),
            "JobsDetail[0].Input.CosHeaders[0].Key contains an unpaired surrogate",
            id="cos-header",
        ),
    ],
)
def test_json_string_with_an_unpaired_surrogate_is_refused_400(
    ledger: Ledger, base_url: str, sent: bytes, message: str
) -> None:
    # The ledger cannot store a lone surrogate (no UTF-8 for it): the parser must refuse it first.
    assert_error(post(base_url, sent), 400, message)
    assert row_counts(ledger) == NOTHING


def test_json_surrogate_pair_is_one_character_and_accepted(ledger: Ledger, base_url: str) -> None:
    sent = DOC_JSON.replace(b'"SUCCESS"', b'"done \\ud83d\\ude00"')

    assert_stored_doc_job(post(base_url, sent), ledger)
    assert ledger.views.show_job(JOB_ID).job.message == "done \U0001f600"


# -- Content-Type (test_receive covers absent, text/plain, JSON for XML and back, form, multipart) -------


@pytest.mark.parametrize(
    ("content_type", "sent"),
    [
        ("application/octet-stream", DOC_JSON),
        ("text/xml; charset=utf-16", DOC_XML),
        ("application/json; charset=iso-8859-1", body("json", job(Message="é"))),
        (";;;=", DOC_XML),
        ("image/png", DOC_JSON),
        ("application/xml; " + "x" * 300, DOC_XML),
    ],
    ids=["octet-stream", "xml-charset-utf16", "json-charset-latin1", "unparseable", "image", "300-chars"],
)
def test_any_content_type_is_accepted_and_stored_up_to_256_characters(
    ledger: Ledger, base_url: str, content_type: str, sent: bytes
) -> None:
    assert_stored_doc_job(post(base_url, sent, content_type), ledger)
    assert stored(ledger) == (sent, content_type[:256])


def test_content_type_with_a_nul_is_accepted_and_stored_without_it(ledger: Ledger, base_url: str) -> None:
    # A raw socket, as requests sends no NUL in a header; PostgreSQL cannot store one (gunicorn refuses it).
    with connect(base_url) as sock:
        sock.sendall(request_head(len(DOC_XML), extra=b"Content-Type: application/xml\x00evil\r\n") + DOC_XML)
        status, _, payload = read_response(sock)

    assert status == 200, payload
    assert row_counts(ledger) == ONE_JOB
    assert stored(ledger) == (DOC_XML, "application/xml\ufffdevil")


# -- bodies over the limit, and bodies cut short -------------------------------------------------------------


def test_huge_declared_length_is_refused_413_without_reading_the_body(ledger: Ledger, base_url: str) -> None:
    declared = 1024 * MiB
    sent = b"x" * (64 * 1024)
    with connect(base_url) as sock:
        sock.sendall(request_head(declared))
        # 64 KiB and then nothing more: had the server waited for the declared 1 GiB (or for the
        # whole body to be read), this read would never return.
        sock.sendall(sent)

        answer = read_response(sock)

    assert_raw_error(answer, 413, f"body is larger than {DEFAULT_LIMIT} bytes")
    assert row_counts(ledger) == NOTHING


def test_chunked_body_still_streaming_past_the_limit_is_refused_413_at_once(ledger: Ledger) -> None:
    limit = 64 * 1024
    piece = b" " * 1024
    with serving(ledger, max_body_bytes=limit) as url, connect(url) as sock:
        sock.sendall(request_head(chunked=True) + b"%x\r\n%s\r\n" % (len(DOC_JSON), DOC_JSON))
        for _ in range(limit // len(piece) + 16):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        # The last chunk ("0\r\n\r\n") is never sent: a server waiting for the end would never answer.

        answer = read_response(sock)

    assert_raw_error(answer, 413, f"body is larger than {limit} bytes")
    assert row_counts(ledger) == NOTHING


def _chunks(data: bytes, size: int = 500) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("extra", [-1, 0])
def test_chunked_body_of_up_to_exactly_the_limit_is_accepted(ledger: Ledger, extra: int) -> None:
    # werkzeug's limited stream raises on any read past the limit: the endpoint must not read one byte more.
    limit = 4096
    sent = DOC_JSON + b" " * (limit + extra - len(DOC_JSON))
    with serving(ledger, max_body_bytes=limit) as url:
        response = post(url, _chunks(sent))

    assert response.request.headers["Transfer-Encoding"] == "chunked"
    assert_stored_doc_job(response, ledger)
    assert stored(ledger)[0] == sent


def test_chunked_body_one_byte_over_the_limit_is_refused_413(ledger: Ledger) -> None:
    limit = 4096
    sent = DOC_JSON + b" " * (limit + 1 - len(DOC_JSON))
    with serving(ledger, max_body_bytes=limit) as url:
        response = post(url, _chunks(sent))

    assert_error(response, 413, f"body is larger than {limit} bytes")
    assert row_counts(ledger) == NOTHING


def test_body_shorter_than_its_content_length_is_refused_400_even_if_what_came_is_valid(
    ledger: Ledger, base_url: str
) -> None:
    with connect(base_url) as sock:
        sock.sendall(request_head(len(DOC_JSON) + 100) + DOC_JSON)
        sock.shutdown(socket.SHUT_WR)  # the client gives up 100 bytes short

        answer = read_response(sock)

    assert_raw_error(answer, 400, "The browser (or proxy) sent a request that this server could not understand.")
    assert row_counts(ledger) == NOTHING


# -- a valid job among hostile neighbours is all or nothing -----------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_one_bad_job_after_valid_ones_stores_none_of_them(ledger: Ledger, base_url: str, fmt: str) -> None:
    details = [job(f"j{n:032x}") for n in range(99)] + [job("j-last", Operation=operation(Output="not an object"))]

    response = post(base_url, body(fmt, details))

    assert_error(response, 400, "JobsDetail[99].Operation.Output must be an object")
    assert row_counts(ledger) == NOTHING


# -- gunicorn: slow clients (see the module docstring), bodies cut short, the limit -----------------------


GUNICORN_TIMEOUT = 2
GUNICORN_LIMIT = 4096


@dataclass
class Gunicorn:
    url: str
    ledger: Ledger
    log: Path


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    """The Procfile's web command with GUNICORN_TIMEOUT=2, one worker and one thread.

    One thread serves requests one after the other, so each check after a request runs once
    that request is completely handled.
    """
    tmp = tmp_path_factory.mktemp("gunicorn")
    database_url = f"sqlite:///{tmp / 'ledger.db'}"
    log = tmp / "web.log"
    env = {
        "WEBHOOK_DATABASE_URL": database_url,
        "WEBHOOK_CALLBACK_TOKEN": TOKEN,
        "WEBHOOK_MAX_BODY_BYTES": str(GUNICORN_LIMIT),
        "GUNICORN_TIMEOUT": str(GUNICORN_TIMEOUT),
        "WEB_CONCURRENCY": "1",
        "GUNICORN_THREADS": "1",
    }
    ledger = Ledger(database_url)
    ledger.migrate()
    try:
        with web(env, log) as (url, proc):
            wait_healthy(url, proc, log)
            yield Gunicorn(url, ledger, log)
    finally:
        ledger.dispose()


def _trickle(sock: socket.socket, data: bytes, pieces: int, pause: float) -> None:
    step = -(-len(data) // pieces)
    for start in range(0, len(data), step):
        sock.sendall(data[start : start + step])
        time.sleep(pause)  # the slow client is the point


def _plus(counts: dict[str, int], n: int) -> dict[str, int]:
    return {table: count + n for table, count in counts.items()}


@pytest.mark.slow
def test_gunicorn_timeout_does_not_cut_off_a_trickling_client(gunicorn: Gunicorn) -> None:
    before = row_counts(gunicorn.ledger)
    sent = DOC_JSON.replace(JOB_ID.encode(), b"j-trickled")

    with connect(gunicorn.url) as sock:
        sock.sendall(request_head(len(sent)))
        # 20 pieces a quarter of a timeout apart: the body takes 5 s, 2.5 x GUNICORN_TIMEOUT.
        _trickle(sock, sent, pieces=20, pause=GUNICORN_TIMEOUT / 8)
        status, _, payload = read_response(sock)

    assert status == 200, payload
    assert json.loads(payload)["jobs"] == [{"job_id": "j-trickled", "duplicate": False}]
    assert row_counts(gunicorn.ledger) == _plus(before, 1)
    logged = gunicorn.log.read_text()
    assert "WORKER TIMEOUT" not in logged
    assert logged.count("Booting worker") == 1, logged


@pytest.mark.slow
def test_gunicorn_body_cut_short_is_refused_400_even_if_what_came_is_valid(gunicorn: Gunicorn) -> None:
    # gunicorn passes a short body on as if it were whole: only the Content-Length shows it is not.
    before = row_counts(gunicorn.ledger)
    sent = DOC_JSON.replace(JOB_ID.encode(), b"j-gave-up")

    with connect(gunicorn.url) as sock:
        sock.sendall(request_head(len(sent) + 100) + sent)
        sock.shutdown(socket.SHUT_WR)
        answer = read_response(sock)

    assert_raw_error(answer, 400, "The browser (or proxy) sent a request that this server could not understand.")
    assert row_counts(gunicorn.ledger) == before


@pytest.mark.slow
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_gunicorn_accepts_exactly_the_limit_and_refuses_one_byte_more(gunicorn: Gunicorn, chunked: bool) -> None:
    # Under gunicorn a Content-Length body is a limited stream too, which raises on a read past the limit.
    before = row_counts(gunicorn.ledger)
    job_id = f"j-limit-{'chunked' if chunked else 'length'}"
    exact = DOC_JSON.replace(JOB_ID.encode(), job_id.encode())
    exact += b" " * (GUNICORN_LIMIT - len(exact))

    def send(data: bytes) -> requests.Response:
        return post(gunicorn.url, _chunks(data) if chunked else data)

    accepted = send(exact)
    refused = send(exact + b" ")

    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["jobs"] == [{"job_id": job_id, "duplicate": False}]
    assert_error(refused, 413, f"body is larger than {GUNICORN_LIMIT} bytes")
    assert row_counts(gunicorn.ledger) == _plus(before, 1)


# -- odd but well-formed documents ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "message"),
    [
        pytest.param(
            b"<" + b"R" * (DEFAULT_LIMIT - 3) + b"/>",
            f"XML root element must be <Response>, not <{'R' * 64}…>",
            id="1-MiB-root-name-is-clipped-in-the-message",
        ),
        pytest.param(
            b"<Response " + b" ".join(b'a%d="1"' % n for n in range(50_000)) + b"/>",
            "missing EventName",
            id="50k-attributes",
        ),
        pytest.param(
            b"<Response><EventName>TaskFinish</EventName>" + b"<JobsDetail/>" * 50_000 + b"</Response>",
            "JobsDetail is empty",
            id="50k-empty-jobsdetail",
        ),
        pytest.param(
            b'{"EventName": "TaskFinish", "JobsDetail": [' + b",".join([b"null"] * 100_000) + b"]}",
            "JobsDetail is empty",
            id="100k-null-jobs",
        ),
    ],
)
def test_odd_but_well_formed_body_is_refused_400(ledger: Ledger, base_url: str, sent: bytes, message: str) -> None:
    assert len(sent) <= DEFAULT_LIMIT

    assert_error(post(base_url, sent), 400, message)
    assert row_counts(ledger) == NOTHING
