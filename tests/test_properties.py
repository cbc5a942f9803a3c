"""Generated bodies (hypothesis) against the parser and the endpoint.

Properties:

* ``parse_callback`` never raises anything but :class:`CallbackError` (status 400 or 413, a
  non-empty message), whatever the bytes: arbitrary bytes, arbitrary text as UTF-8, generated
  JSON documents, generated XML element trees, and mutations of valid callbacks. What it
  returns is storable: every string encodes to UTF-8 without a NUL, every JobId matches its
  pattern, at most 100 jobs.
* Valid jobs round-trip: a callback built from generated valid job dicts parses, from JSON and
  from XML alike, to exactly the jobs it was built from.
* The endpoint, over a real socket, answers what the parser says (its exact 4xx and message,
  or 200) or 413 over the body limit; never a 5xx. A 4xx stores nothing; a 200 stores one
  callback and exactly the jobs and tasks its answer lists.

Examples per test follow the hypothesis profile conftest.py loads: ``ci`` (CI=true) runs 12,000
(5 x 2,000 on the parser, 1,000 round trips, 1,000 requests), ``dev`` a tenth of that.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import pytest
import requests
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.endpoint import row_counts
from support.samples import DOC_JSON, DOC_XML, JOB_ID, body, job, operation, to_xml

from webhook.config import Settings
from webhook.intake.callback import MAX_JOBS_PER_CALLBACK, CallbackError, parse_callback
from webhook.intake.fields import MAX_FIELD_LENGTH
from webhook.ledger import Ledger
from webhook.ledger.schema import jobs
from webhook.models import Callback, CosHeader, Job, JobState, ObjectLocation, Workflow, job_to_dict
from webhook.web.app import create_app
from webhook.web.server import BackgroundServer

pytestmark = pytest.mark.slow  # seconds even under the dev profile; minutes under ci

# max_examples comes from the loaded profile; the round trip and the endpoint run half as many.
PARSER = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ROUND_TRIP = settings(PARSER, max_examples=PARSER.max_examples // 2)
ENDPOINT = settings(PARSER, max_examples=PARSER.max_examples // 2)

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
EVENTS = ("TaskFinish", "WorkflowFinish")
JOB_KEYS = (
    "JobId",
    "Tag",
    "State",
    "Code",
    "Message",
    "CreationTime",
    "StartTime",
    "EndTime",
    "QueueId",
    "QueueType",
    "Input",
    "Operation",
    "Workflow",
)
INNER_KEYS = (
    "BucketId",
    "Bucket",
    "Region",
    "Object",
    "CosHeaders",
    "Key",
    "Value",
    "Output",
    "UserData",
    "JobLevel",
    "TemplateId",
    "TemplateName",
    "NoiseReduction",
    "Format",
    "SampleRate",
    "Samplerate",
    "Name",
    "RunId",
    "WorkflowId",
    "WorkflowName",
)
KNOWN_KEYS = ("EventName", "JobsDetail", *JOB_KEYS, *INNER_KEYS)


# -- checks ------------------------------------------------------------------------------------------


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def outcome(sent: bytes) -> Callback | CallbackError:
    """What the parser makes of ``sent``: a storable Callback or a well-formed CallbackError."""
    try:
        callback = parse_callback(sent)
    except CallbackError as exc:
        refused = exc
    else:
        return _storable(callback)
    assert refused.status in (400, 413)
    assert isinstance(refused.message, str)
    assert refused.message.strip()
    assert str(refused) == refused.message
    return refused


def _storable(callback: Callback) -> Callback:
    assert isinstance(callback, Callback)
    assert callback.body_format in ("json", "xml")
    assert callback.event_name
    assert len(callback.jobs) <= MAX_JOBS_PER_CALLBACK
    assert len({j.job_id for j in callback.jobs}) == len(callback.jobs)
    for parsed in callback.jobs:
        assert _JOB_ID.fullmatch(parsed.job_id)
        assert parsed.tag
        assert parsed.state in {s.value for s in JobState}
    for text in [callback.event_name, *_strings([job_to_dict(j) for j in callback.jobs])]:
        text.encode("utf-8")  # as the ledger will: a lone surrogate raises
        assert "\x00" not in text
        assert len(text) <= MAX_FIELD_LENGTH
    return callback


# -- strategies: bytes and text ----------------------------------------------------------------------

PREFIXES = (b"", b"<", b"{", b"[", b" \r\n", b"\xef\xbb\xbf", b"<Response>", b'{"EventName":')
arbitrary_bytes = st.tuples(st.sampled_from(PREFIXES), st.binary(max_size=300)).map(b"".join)

any_text = st.text(st.characters(codec="utf-8"), max_size=300)
utf8_text = st.one_of(
    any_text,
    st.tuples(
        st.sampled_from(["<", "{", "[", "<Response>", '{"EventName": "TaskFinish", "JobsDetail": ']), any_text
    ).map("".join),
).map(str.encode)

# -- strategies: JSON ----------------------------------------------------------------------------------

# Any code point, surrogates included: json.dumps escapes a lone one as "\udXXX".
json_text = st.one_of(
    st.text(st.characters(), max_size=20),
    st.sampled_from([*EVENTS, JOB_ID, "NoiseReduction", "Success", "Failed", "", " ", "\x00"]),
)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), json_text
)
json_keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8))
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=5), st.dictionaries(json_keys, children, max_size=5)),
    max_leaves=10,
)

# -- strategies: valid jobs, and the Job each one must parse to ------------------------------------------

# Text that XML and JSON carry alike: XML has no control characters, surrogates or U+FFFE/FFFF,
# reads "\r\n" as "\n", and xmltodict strips leading and trailing whitespace.
_xml_chars = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Cn"))
plain_text = st.text(_xml_chars, max_size=12).map(str.strip)
# Starts with a non-space character, so it stays non-empty once stripped (no filter to retry).
some_text = st.tuples(_xml_chars.filter(lambda c: not c.isspace()), plain_text).map(lambda t: (t[0] + t[1]).strip())
job_ids = st.from_regex(_JOB_ID, fullmatch=True)
states = st.sampled_from([s.value for s in JobState])


@dataclass(frozen=True)
class Generated:
    detail: dict[str, Any]
    expected: Job


@st.composite
def _container(draw: st.DrawFn, keys: tuple[str, ...]) -> dict[str, str] | None:
    """All of ``keys`` (possibly empty strings) or None for an absent container."""
    if draw(st.booleans()):
        return None
    return {key: draw(plain_text) for key in keys}


def _put(draw: st.DrawFn, target: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key``; an empty string may be left out instead, which parses the same."""
    if value == "" and draw(st.booleans()):
        return
    target[key] = value


@st.composite
def valid_jobs(draw: st.DrawFn, job_id: str | None = None) -> Generated:
    detail: dict[str, Any] = {}
    values: dict[str, Any] = {
        "job_id": job_id or draw(job_ids),
        "tag": draw(st.one_of(st.sampled_from(["NoiseReduction", "VoiceSeparate"]), some_text)),
        "state": draw(states),
    }
    detail.update({"JobId": values["job_id"], "Tag": values["tag"], "State": values["state"]})
    for key, field in [
        ("Code", "code"),
        ("Message", "message"),
        ("CreationTime", "creation_time"),
        ("StartTime", "start_time"),
        ("EndTime", "end_time"),
        ("QueueId", "queue_id"),
        ("QueueType", "queue_type"),
    ]:
        values[field] = draw(plain_text)
        _put(draw, detail, key, values[field])

    input_ = _draw_location(draw, "BucketId")
    headers = draw(st.lists(st.tuples(plain_text, plain_text), max_size=3))
    values["cos_headers"] = tuple(CosHeader(key, value) for key, value in headers)
    if headers:  # XML cannot tell an empty list from no element at all
        input_ = dict(input_ or {})
        input_["CosHeaders"] = [{"Key": key, "Value": value} for key, value in headers]
        if len(headers) == 1 and draw(st.booleans()):
            input_["CosHeaders"] = input_["CosHeaders"][0]
    values["input"] = _location(input_, "BucketId")
    if input_ is not None:
        detail["Input"] = input_

    op: dict[str, Any] = {}
    output = _draw_location(draw, "Bucket")
    values["output"] = _location(output, "Bucket")
    if output is not None:
        op["Output"] = output
    for key, field in [
        ("UserData", "user_data"),
        ("JobLevel", "job_level"),
        ("TemplateId", "template_id"),
        ("TemplateName", "template_name"),
    ]:
        values[field] = draw(plain_text)
        _put(draw, op, key, values[field])
    noise = draw(_container(("Format", draw(st.sampled_from(["SampleRate", "Samplerate"])))))
    values["format"] = noise["Format"] if noise else ""
    values["sample_rate"] = next((v for k, v in (noise or {}).items() if k != "Format"), "")
    if noise is not None:
        op["NoiseReduction"] = noise
    if op:
        detail["Operation"] = op

    workflow = draw(_container(("Name", "RunId", "WorkflowId", "WorkflowName")))
    values["workflow"] = Workflow(*workflow.values()) if workflow else None
    if workflow is not None:
        detail["Workflow"] = workflow

    keys = list(detail)
    order = draw(st.permutations(keys))  # CI's key order is not part of the contract
    return Generated({key: detail[key] for key in order}, Job(**values))


def _draw_location(draw: st.DrawFn, bucket_key: str) -> dict[str, str] | None:
    return draw(_container((bucket_key, "Region", "Object")))


def _location(container: dict[str, Any] | None, bucket_key: str) -> ObjectLocation | None:
    if not container:
        return None
    return ObjectLocation(
        bucket=container.get(bucket_key, ""), region=container.get("Region", ""), key=container.get("Object", "")
    )


@st.composite
def valid_callbacks(draw: st.DrawFn) -> tuple[str, Any, tuple[Job, ...]]:
    """(EventName, JobsDetail as CI would put it, the jobs it must parse to)."""
    ids = draw(st.lists(job_ids, min_size=1, max_size=3, unique=True))
    generated = [draw(valid_jobs(job_id)) for job_id in ids]
    details: Any = [g.detail for g in generated]
    if len(details) == 1 and draw(st.booleans()):
        details = details[0]
    event = draw(st.one_of(st.sampled_from(EVENTS), some_text))
    return event, details, tuple(g.expected for g in generated)


@st.composite
def near_valid_jobs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid job with some of its keys replaced by anything JSON can hold."""
    detail = dict(draw(valid_jobs()).detail)
    overrides = draw(st.dictionaries(st.sampled_from(JOB_KEYS), json_values, max_size=3))
    detail.update(overrides)
    for key in draw(st.lists(st.sampled_from(JOB_KEYS), max_size=2)):
        detail.pop(key, None)
    return detail


@st.composite
def json_documents(draw: st.DrawFn) -> bytes:
    doc: Any
    if draw(st.integers(0, 9)) == 0:
        doc = draw(json_values)  # anything at the top, arrays and scalars included
    else:
        doc = draw(st.dictionaries(json_keys, json_values, max_size=4))
        if draw(st.booleans()):
            doc["EventName"] = draw(st.one_of(st.sampled_from(EVENTS), json_values))
        shape = draw(st.integers(0, 3))
        if shape == 1:
            doc["JobsDetail"] = draw(near_valid_jobs())
        elif shape == 2:
            doc["JobsDetail"] = draw(st.lists(near_valid_jobs(), max_size=3))
        elif shape == 3:
            doc["JobsDetail"] = draw(json_values)
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 2])))
    # Unescaped lone surrogates become bytes that are not UTF-8 (CESU-8): another refusal path.
    return text.encode("utf-8", "surrogatepass")


# -- strategies: XML ----------------------------------------------------------------------------------------

xml_names = st.one_of(
    st.sampled_from(("Response", *KNOWN_KEYS)), st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,8}", fullmatch=True)
)
# Any UTF-8 text, escaped: characters XML forbids (controls) make it malformed, which is fine.
xml_text = st.text(st.characters(codec="utf-8"), max_size=20).map(escape)
xml_attributes = st.dictionaries(
    st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True), st.text(max_size=8), max_size=2
).map(lambda attrs: "".join(f" {name}={quoteattr(value)}" for name, value in attrs.items()))


def _element(name: str, attrs: str, content: list[str] | str) -> str:
    inner = content if isinstance(content, str) else "".join(content)
    return f"<{name}{attrs}/>" if not inner else f"<{name}{attrs}>{inner}</{name}>"


xml_leaves = st.one_of(
    st.builds(_element, xml_names, xml_attributes, xml_text),
    valid_jobs().map(lambda g: to_xml("JobsDetail", g.detail)),
    st.sampled_from(["<![CDATA[TaskFinish]]>", "<!-- c -->", "<?pi x?>", "&amp;", "&#xD800;", "&nope;"]),
)
xml_elements = st.recursive(
    xml_leaves,
    lambda children: st.builds(
        _element, xml_names, xml_attributes, st.lists(st.one_of(children, xml_text), max_size=4)
    ),
    max_leaves=10,
)


@st.composite
def xml_documents(draw: st.DrawFn) -> bytes:
    children = draw(st.lists(xml_elements, max_size=4))
    if draw(st.booleans()):
        children.insert(0, _element("EventName", "", escape(draw(st.one_of(st.sampled_from(EVENTS), xml_text)))))
    root = draw(st.one_of(st.just("Response"), xml_names))
    document = _element(root, draw(xml_attributes), children)
    prolog = draw(st.sampled_from(["", '<?xml version="1.0" encoding="UTF-8"?>', "\ufeff", "<!-- x -->"]))
    return (prolog + document).encode()


# -- strategies: mutations of valid callbacks ------------------------------------------------------------------

SEEDS = (
    DOC_XML,
    DOC_JSON,
    body("xml", [job(), job("j2", State="Failed", Code="InternalError")]),
    body("json", [job(), job("j2", Tag="VoiceSeparate")]),
    body(
        "xml",
        job(
            Input={"BucketId": "b-1", "CosHeaders": [{"Key": "k", "Value": "v"}, {"Key": "a", "Value": None}]},
            Workflow={"Name": "n", "RunId": "r", "WorkflowId": "w", "WorkflowName": "wn"},
        ),
    ),
    body("json", job(Operation=operation(NoiseReduction={"Format": "mp3", "Samplerate": 44100}))),
    body("xml", event="WorkflowFinish", WorkflowExecution={"RunId": "i5f7a", "State": "Success"}),
    body("json", job(Message="降噪完成 & <ok>"), event="WorkflowFinish"),
)
SNIPPETS = (
    b"\x00",
    b"\xff",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\xef\xbb\xbf",
    b"\\ud800",
    b"\\u0000",
    b"<!DOCTYPE Response>",
    b"<!ENTITY a 'b'>",
    b"&a;",
    b"&#0;",
    b"<a>",
    b"</JobsDetail>",
    b"<JobsDetail>",
    b"<![CDATA[",
    b"]]>",
    b'"',
    b"{",
    b"[",
    b"null",
    b"1e999",
    b"NaN",
    b'"JobsDetail":',
    b"," * 3,
)
mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.one_of(st.sampled_from(SNIPPETS), st.binary(max_size=6))),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 32)),
    st.tuples(st.just("repeat"), st.integers(0, 10_000), st.integers(1, 64)),
)


def _mutate(seed: bytes, steps: list[tuple[str, int, Any]]) -> bytes:
    data = bytearray(seed)
    for kind, position, arg in steps:
        at = position % (len(data) + 1)
        if kind == "flip" and at < len(data):
            data[at] ^= arg
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = arg
        elif kind == "delete":
            del data[at : at + arg]
        elif kind == "repeat":
            data[at:at] = data[at : at + arg]
    return bytes(data)


mutated_samples = st.builds(_mutate, st.sampled_from(SEEDS), st.lists(mutations, min_size=1, max_size=4))


# -- the parser --------------------------------------------------------------------------------------------------


@PARSER
@given(sent=arbitrary_bytes)
def test_parser_on_arbitrary_bytes(sent: bytes) -> None:
    outcome(sent)


@PARSER
@given(sent=utf8_text)
def test_parser_on_arbitrary_utf8_text(sent: bytes) -> None:
    outcome(sent)


@PARSER
@given(sent=json_documents())
def test_parser_on_generated_json(sent: bytes) -> None:
    outcome(sent)


@PARSER
@given(sent=xml_documents())
def test_parser_on_generated_xml(sent: bytes) -> None:
    outcome(sent)


@PARSER
@given(sent=mutated_samples)
def test_parser_on_mutated_valid_callbacks(sent: bytes) -> None:
    outcome(sent)


@ROUND_TRIP
@given(generated=valid_callbacks(), extra=st.dictionaries(st.sampled_from(["RequestId", "Trace"]), some_text))
def test_valid_jobs_round_trip_through_json_and_xml(
    generated: tuple[str, Any, tuple[Job, ...]], extra: dict[str, str]
) -> None:
    event, details, expected = generated
    for fmt in ("json", "xml"):
        assert parse_callback(body(fmt, details, event, **extra)) == Callback(event, expected, fmt)


# -- the endpoint ---------------------------------------------------------------------------------------------------

TOKEN = "cb-properties-0123456789"
LIMIT = 4096  # small enough that generated bodies cross it


@dataclass
class Endpoint:
    url: str
    ledger: Ledger
    session: requests.Session


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    """One server and SQLite ledger for every example; each compares row counts before and after."""
    database_url = f"sqlite:///{tmp_path_factory.mktemp('properties') / 'ledger.db'}"
    settings = Settings(database_url=database_url, callback_tokens=(TOKEN,), max_body_bytes=LIMIT, log_level="WARNING")
    ledger = Ledger(database_url)
    ledger.migrate()
    with BackgroundServer(create_app(settings, ledger)) as server, requests.Session() as session:
        yield Endpoint(f"{server.url}/callback/{TOKEN}", ledger, session)
    ledger.dispose()


any_body = st.one_of(
    arbitrary_bytes,
    utf8_text,
    json_documents(),
    xml_documents(),
    mutated_samples,
    st.builds(lambda g, fmt: body(fmt, g[1], g[0]), valid_callbacks(), st.sampled_from(["json", "xml"])),
)


def _pieces(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), 700):
        yield data[start : start + 700]


def known_job_ids(ledger: Ledger) -> set[str]:
    with ledger.engine.connect() as conn:
        return set(conn.execute(sa.select(jobs.c.job_id)).scalars())


@ENDPOINT
@given(sent=any_body, chunked=st.booleans())
def test_endpoint_answers_200_or_4xx_and_stores_all_or_nothing(endpoint: Endpoint, sent: bytes, chunked: bool) -> None:
    before = row_counts(endpoint.ledger)
    known = known_job_ids(endpoint.ledger)

    response = endpoint.session.post(endpoint.url, data=_pieces(sent) if chunked else sent, timeout=30)

    after = row_counts(endpoint.ledger)
    answer = response.json()
    expected = outcome(sent) if len(sent) <= LIMIT else CallbackError(f"body is larger than {LIMIT} bytes", 413)
    if isinstance(expected, CallbackError):
        assert (response.status_code, answer) == (
            expected.status,
            {"error": expected.message, "status": expected.status},
        )
        assert after == before
        return
    assert response.status_code == 200, answer
    assert answer["event"] == expected.event_name
    assert sorted(j["job_id"] for j in answer["jobs"]) == sorted(j.job_id for j in expected.jobs)
    # A job already known and reported new is a new version of it, verified again with its task.
    new = [j["job_id"] for j in answer["jobs"] if not j["duplicate"]]
    inserted = [j for j in new if j not in known]
    assert set(answer["ignored"]) <= set(inserted)
    forwarded = len(inserted) - len(answer["ignored"])
    assert after == {
        "callbacks": before["callbacks"] + 1,
        "jobs": before["jobs"] + len(inserted),
        "job_versions": before["job_versions"] + forwarded + len(new) - len(inserted),
        "tasks": before["tasks"] + forwarded,
    }
