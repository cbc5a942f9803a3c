"""The published API description is the service's: ``openapi.yaml`` for the HTTP endpoints and
``schemas/event-v1.schema.json`` for the ``cos-webhook.event/v1`` document sinks receive.

Real answers from a receiver on a real socket, and real events delivered by pipeline runs, are
validated against them; the schemas are strict enough that a renamed field fails.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import sqlalchemy as sa
import yaml
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from support.endpoint import TOKEN, serving
from support.pipeline import DONE, Pipeline, multipart_files
from support.samples import DOC_JSON, DOC_XML, body, job
from support.services import require_service

from webhook.config import Settings
from webhook.ledger import Ledger
from webhook.web.app import create_app
from webhook.web.server import BackgroundServer

ROOT = Path(__file__).resolve().parents[1]
OPENAPI_PATH = ROOT / "openapi.yaml"
EVENT_SCHEMA_PATH = ROOT / "schemas" / "event-v1.schema.json"
OPENAPI: dict[str, Any] = yaml.safe_load(OPENAPI_PATH.read_text())
EVENT_SCHEMA: dict[str, Any] = json.loads(EVENT_SCHEMA_PATH.read_text())
# Both files by their URIs, so the OpenAPI's references (its components, the event schema) resolve.
REGISTRY: Registry[Any] = Registry().with_resources(
    (path.as_uri(), Resource.from_contents(doc, default_specification=DRAFT202012))
    for path, doc in ((OPENAPI_PATH, OPENAPI), (EVENT_SCHEMA_PATH, EVENT_SCHEMA))
)
SMALL_LIMIT = 2048
CALLBACK = "/callback/{token}"


def schema_at(*parts: str) -> Draft202012Validator:
    """A validator for the schema at ``parts`` of ``openapi.yaml`` (a JSON pointer, unescaped)."""
    pointer = "/".join(part.replace("~", "~0").replace("/", "~1") for part in parts)
    return Draft202012Validator({"$ref": f"{OPENAPI_PATH.as_uri()}#/{pointer}"}, registry=REGISTRY)


def check_answer(response: requests.Response, path: str, method: str) -> None:
    """``response`` is an answer ``openapi.yaml`` documents for ``method path``: status, headers and body."""
    parts = ["paths", path, method, "responses", str(response.status_code)]
    documented = OPENAPI["paths"][path][method]["responses"].get(str(response.status_code))
    assert documented is not None, f"{method.upper()} {path} answered {response.status_code}: not documented"
    if "$ref" in documented:
        parts = documented["$ref"].removeprefix("#/").split("/")
        documented = OPENAPI[parts[0]][parts[1]][parts[2]]
    for name, header in documented.get("headers", {}).items():
        if "$ref" in header:
            header = OPENAPI["components"]["headers"][header["$ref"].rpartition("/")[2]]
        if header.get("required") or name in response.headers:
            assert name in response.headers, f"{response.status_code} without its {name} header"
            Draft202012Validator(header["schema"]).validate(response.headers[name])
    media = response.headers["Content-Type"].partition(";")[0].strip()
    assert media in documented["content"], f"{response.status_code} answered as {media}"
    answer = response.json() if media == "application/json" else response.text
    schema_at(*parts, "content", media, "schema").validate(answer)


def references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from references(value)
    elif isinstance(node, list):
        for value in node:
            yield from references(value)


# -- the files themselves ---------------------------------------------------------------------------


def test_the_openapi_description_is_valid_and_every_reference_resolves() -> None:
    validate(OPENAPI, base_uri=OPENAPI_PATH.as_uri())
    # The validator does not follow a schema's reference into another file: the event schema.
    resolver = REGISTRY.resolver(base_uri=OPENAPI_PATH.as_uri())
    found = list(references(OPENAPI))
    assert "schemas/event-v1.schema.json" in found
    for ref in found:
        resolver.lookup(ref)


def test_the_event_schema_is_a_valid_json_schema() -> None:
    Draft202012Validator.check_schema(EVENT_SCHEMA)
    assert EVENT_SCHEMA["properties"]["schema"]["const"] == "cos-webhook.event/v1"


# -- real answers ------------------------------------------------------------------------------------


@pytest.fixture
def base_url(ledger: Ledger) -> Iterator[str]:
    with serving(ledger, max_body_bytes=SMALL_LIMIT) as url:
        yield url


OVER_LIMIT = body("json", job(Message="m" * 3000))


@pytest.mark.parametrize(
    ("method", "token", "sent", "status"),
    [
        pytest.param("post", TOKEN, DOC_JSON, 200, id="json"),
        pytest.param("post", TOKEN, DOC_XML, 200, id="xml"),
        pytest.param("post", TOKEN, body("json", job(Tag="VoiceSeparate")), 200, id="ignored"),
        pytest.param("post", TOKEN, body("xml", None, event="WorkflowFinish"), 200, id="other-event"),
        pytest.param("post", TOKEN, b'{"EventName": "TaskFinish", "JobsDetail": [', 400, id="malformed"),
        pytest.param("post", TOKEN, b"", 400, id="empty"),
        pytest.param("post", "wrong-token-0123456789", DOC_JSON, 404, id="unknown-token"),
        pytest.param("post", TOKEN, OVER_LIMIT, 413, id="too-large"),
        pytest.param("get", TOKEN, None, 405, id="get"),
    ],
)
def test_callback_answers_are_as_described(base_url: str, method: str, token: str, sent: bytes, status: int) -> None:
    response = requests.request(method, f"{base_url}/callback/{token}", data=sent, timeout=30)

    assert response.status_code == status
    # A method the path does not take is described on the path's one operation.
    check_answer(response, CALLBACK, "post")


def test_a_duplicate_callback_answer_is_as_described(base_url: str) -> None:
    first = requests.post(f"{base_url}/callback/{TOKEN}", data=DOC_JSON, timeout=30)
    again = requests.post(f"{base_url}/callback/{TOKEN}", data=DOC_XML, timeout=30)

    assert (first.json()["duplicate"], again.json()["duplicate"]) == (False, True)
    for response in (first, again):
        check_answer(response, CALLBACK, "post")


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/healthz", "/metrics"])
def test_probe_and_metrics_answers_are_as_described(base_url: str, path: str) -> None:
    response = requests.get(f"{base_url}{path}", timeout=30)

    assert response.status_code == 200
    check_answer(response, path, "get")


def test_a_ledger_that_cannot_be_written_answers_as_described(ledger: Ledger, base_url: str) -> None:
    with ledger.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE job_versions"))

    stored = requests.post(f"{base_url}/callback/{TOKEN}", data=DOC_JSON, timeout=30)
    ready = requests.get(f"{base_url}/readyz", timeout=30)

    assert (stored.status_code, ready.status_code) == (503, 503)
    check_answer(stored, CALLBACK, "post")
    check_answer(ready, "/readyz", "get")


def test_refused_sources_are_answered_as_described(ledger: Ledger) -> None:
    settings = Settings(database_url=ledger.url, callback_tokens=(TOKEN,), allowed_sources="192.0.2.0/24")
    with BackgroundServer(create_app(settings, ledger), name="refusing") as server:
        callback = requests.post(f"{server.url}/callback/{TOKEN}", data=DOC_JSON, timeout=30)
        metrics = requests.get(f"{server.url}/metrics", timeout=30)

    assert (callback.status_code, metrics.status_code) == (403, 403)
    check_answer(callback, CALLBACK, "post")
    check_answer(metrics, "/metrics", "get")


def test_the_request_id_given_is_the_one_answered(base_url: str) -> None:
    given = requests.get(
        f"{base_url}/livez", headers={"X-Request-Id": "Root=1-5759e988-bd862e3fe1be46a994272793"}, timeout=30
    )
    made = requests.get(f"{base_url}/livez", headers={"X-Request-Id": "x" * 129}, timeout=30)

    assert given.headers["X-Request-Id"] == "Root=1-5759e988-bd862e3fe1be46a994272793"
    assert made.headers["X-Request-Id"] != "x" * 129
    check_answer(made, "/livez", "get")


# -- real events -------------------------------------------------------------------------------------

EVENTS = Draft202012Validator(EVENT_SCHEMA)
# What the http sink's metadata part is, per openapi.yaml: the same schema, reached by reference.
HTTP_METADATA = schema_at(
    "webhooks", "jobEvent", "post", "requestBody", "content", "multipart/form-data", "schema", "properties", "metadata"
)
HTTP_JSON = schema_at("webhooks", "jobEvent", "post", "requestBody", "content", "application/json", "schema")


def delivered_events(pipeline: Pipeline, job_id: str) -> list[dict[str, Any]]:
    """The documents the filesystem sink wrote and the http sink posted for ``job_id``."""
    written = json.loads((pipeline.sink_dir / f"{job_id}.event.json").read_text())
    posted = [multipart_files(request)[0] for request in pipeline.http.requests]
    assert [document["job"]["job_id"] for document in posted] == [job_id]
    return [written, *posted]


def test_a_succeeded_job_s_events_match_the_schema(pipeline: Pipeline) -> None:
    job_id = pipeline.submit(pipeline.upload_input())
    assert pipeline.drain(pipeline.worker(), job_id, {"delivered", "dead", "rejected"}) == "delivered"

    events = delivered_events(pipeline, job_id)
    assert [event["type"] for event in events] == ["job.succeeded", "job.succeeded"]
    for event in events:
        EVENTS.validate(event)
        HTTP_METADATA.validate(event)


def test_the_events_of_a_job_that_wrote_two_files_match_the_schema(pipeline: Pipeline) -> None:
    pipeline.sandbox.output_parts = 2
    job_id = pipeline.submit(pipeline.upload_input(), output_key="out/${InputName}-${Number}.${ext}")
    assert pipeline.drain(pipeline.worker(), job_id, {"delivered", "dead", "rejected"}) == "delivered"

    events = delivered_events(pipeline, job_id)
    assert [len(event["files"]) for event in events] == [2, 2]
    for event in events:
        EVENTS.validate(event)
        HTTP_METADATA.validate(event)


def test_a_failed_job_s_events_match_the_schema(pipeline: Pipeline) -> None:
    job_id = pipeline.submit("in/missing.wav")  # CI fails the job: its input does not exist
    assert pipeline.drain(pipeline.worker(), job_id, DONE, timeout=30) == "failed"

    events = delivered_events(pipeline, job_id)
    assert [(event["type"], event["job"]["state"], event["file"]) for event in events] == [
        ("job.failed", "Failed", None),
        ("job.failed", "Failed", None),
    ]
    for event in events:
        EVENTS.validate(event)


def test_a_notification_s_event_with_its_file_location_matches_the_schema(pipeline: Pipeline, tmp_path: Path) -> None:
    require_service("Redis", "127.0.0.1", 6379)
    stream = f"test:cos-webhook:{uuid.uuid4().hex}"
    config = tmp_path / "cos-webhook.toml"
    config.write_text(
        f'[[sinks]]\nname = "events"\ntype = "redis"\n'
        f'options = {{ url = "redis://127.0.0.1:6379/0", stream = "{stream}", presign_seconds = 600 }}\n'
    )
    with redis.Redis(host="127.0.0.1", port=6379, decode_responses=True) as client:
        try:
            assert pipeline.run_job(config)[1] == "delivered"
            ((_, entry),) = client.xrange(stream)
        finally:
            client.delete(stream)

    event = json.loads(entry["data"])
    assert event["file"]["location"]["kind"] == "source"
    EVENTS.validate(event)


def test_a_json_http_sink_s_body_matches_the_schema(pipeline: Pipeline) -> None:
    pipeline.settings = pipeline.settings.replace(http_sink_mode="json")
    job_id = pipeline.submit(pipeline.upload_input())
    assert pipeline.drain(pipeline.worker(), job_id, {"delivered", "dead", "rejected"}) == "delivered"

    (request,) = pipeline.http.requests
    assert request.headers["content-type"] == "application/json"
    event = json.loads(request.body or b"")
    assert event["file"]["location"]["kind"] == "source"
    EVENTS.validate(event)
    HTTP_JSON.validate(event)


def test_the_event_schema_catches_a_renamed_or_added_field(pipeline: Pipeline) -> None:
    job_id = pipeline.submit(pipeline.upload_input())
    assert pipeline.drain(pipeline.worker(), job_id, {"delivered", "dead", "rejected"}) == "delivered"
    (event, *_) = delivered_events(pipeline, job_id)

    def changed(*path: str | int, to: str | None = None, value: Any = None) -> dict[str, Any]:
        """``event`` with the member at ``path`` renamed ``to`` (or, with ``value``, set to it)."""
        copied = copy.deepcopy(event)
        parent = copied
        for key in path[:-1]:
            parent = parent[key]
        if to is None:
            parent[path[-1]] = value
        else:
            parent[to] = parent.pop(path[-1])
        return copied

    assert EVENTS.is_valid(event)
    broken = {
        "event_id renamed": changed("event_id", to="id"),
        "job.user_data renamed": changed("job", "user_data", to="userData"),
        "job.input.key renamed": changed("job", "input", "key", to="object"),
        "file.crc64 renamed": changed("file", "crc64", to="crc"),
        "a member added": changed("job", "priority", value="high"),
        "job.failed with a file": changed("type", value="job.failed"),
        "job.succeeded without a file": changed("file", value=None),
        "another schema": changed("schema", value="cos-webhook.event/v2"),
        "size as text": changed("file", "size", value="1024"),
        "files[0].stored_as renamed": changed("files", 0, "stored_as", to="stored"),
        "stored_as on file": changed("file", "stored_as", value=f"{job_id}.wav"),
        "job.succeeded without files": changed("files", value=[]),
    }
    assert [name for name, document in broken.items() if EVENTS.is_valid(document)] == []
