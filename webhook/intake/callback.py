"""Parse a CI callback body (XML or JSON, every documented shape) into a :class:`Callback`.

Pure: no I/O. Every problem raises :class:`CallbackError` with a message that names it,
so the endpoint can answer a 4xx without storing anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from xml.parsers import expat
from xml.parsers.expat import ExpatError

import xmltodict

from webhook.models import (
    Callback,
    CosHeader,
    FileDigest,
    Job,
    JobState,
    MediaSummary,
    ObjectLocation,
    OutputFile,
    Workflow,
)

TASK_FINISH = "TaskFinish"
WORKFLOW_FINISH = "WorkflowFinish"
MAX_JOBS_PER_CALLBACK = 100
MAX_FIELD_LENGTH = 4096
MAX_OUTPUT_NAMES = 1000  # object names (and their digests) one job's MediaResult may list
# CI's deepest element is about 7 levels down (Response/JobsDetail/Operation/MediaResult/…).
MAX_XML_DEPTH = 100
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_STATES = ", ".join(s.value for s in JobState)
# Expat expands internal entities before any handler sees them; refusing the declaration
# itself is the only way to rule out entity-expansion bombs and external entities.
_DTD = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_DTD_REFUSED = "XML with a DOCTYPE or entity declaration is not accepted"
# Only a JSON escape ("\ud800") can produce one; no UTF-8 encoder, so neither database, accepts it.
_SURROGATE = re.compile("[\ud800-\udfff]")


class CallbackError(ValueError):
    """A callback that cannot be accepted; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def parse_callback(body: bytes) -> Callback:
    """Parse ``body`` by its content; the Content-Type header is not trusted."""
    text = _decode(body)
    text = text.strip()
    if text.startswith("<"):
        return _normalize(_load_xml(text), "xml")
    if text.startswith(("{", "[")):
        return _normalize(_load_json(text), "json")
    raise CallbackError("body is neither JSON nor XML")


def _decode(body: bytes) -> str:
    if not body.strip():
        raise CallbackError("body is empty")
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CallbackError(f"body is not valid UTF-8 (byte {exc.start})") from None
    # Neither JSON nor XML allows a raw NUL, but expat reads "<\0R\0..." as UTF-16 whatever
    # encoding it is told: a BOM-less UTF-16 body then slipped past the DOCTYPE check on the text.
    if "\x00" in text:
        raise CallbackError(f"body contains a NUL byte (byte {body.index(0)})")
    return text


def _load_json(text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except RecursionError:
        raise CallbackError("JSON is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise CallbackError(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # e.g. an integer longer than Python converts
        raise CallbackError(f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CallbackError("JSON body must be an object")
    return doc


def _load_xml(text: str) -> dict[str, Any]:
    if _DTD.search(text):
        raise CallbackError(_DTD_REFUSED)
    _check_xml(text)
    try:
        # Whitespace is kept: DescribeMediaJob's answer keeps it too, and " x" != "x" would make
        # verification reject a genuine job whose user data or key starts or ends with a space.
        doc = xmltodict.parse(
            text, disable_entities=True, strip_whitespace=False, force_list=("JobsDetail", "CosHeaders")
        )
    except ExpatError as exc:
        raise CallbackError(f"malformed XML: {exc}") from None
    root = next(iter(doc))
    if root != "Response":
        # Clipped: an element name can be as long as the body, and the message is answered and logged.
        raise CallbackError(f"XML root element must be <Response>, not <{_clip(root)}>")
    body = doc[root]
    if not isinstance(body, dict):
        raise CallbackError("<Response> is empty")
    return body


def _clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _check_xml(text: str) -> None:
    """Read the document once with expat alone, before xmltodict builds anything from it.

    xmltodict keeps unknown elements and would build one dict per nested element, so the depth
    is bounded here. A DOCTYPE is refused again at the parser, in case the pattern above ever
    misses one, because xmltodict's own entity guard raises a plain ValueError, not a 400.
    """
    parser = expat.ParserCreate("utf-8")  # as xmltodict does for text: the declaration is not trusted
    depth = 0

    def start(_name: str, _attrs: Any) -> None:
        nonlocal depth
        depth += 1
        if depth > MAX_XML_DEPTH:
            raise CallbackError(f"XML is nested more than {MAX_XML_DEPTH} elements deep")

    def end(_name: str) -> None:
        nonlocal depth
        depth -= 1

    def doctype(*_args: Any) -> None:
        raise CallbackError(_DTD_REFUSED)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.StartDoctypeDeclHandler = doctype
    try:
        parser.Parse(text.encode(), True)
    except ExpatError as exc:
        raise CallbackError(f"malformed XML: {exc}") from None


def _normalize(doc: dict[str, Any], body_format: str) -> Callback:
    event_name = _string(doc, "EventName", "")
    if not event_name:
        raise CallbackError("missing EventName")
    if event_name == WORKFLOW_FINISH and doc.get("WorkflowExecution") is not None:
        return Callback(event_name=event_name, jobs=_workflow_tasks(doc), body_format=body_format)
    details = doc.get("JobsDetail")
    if details is None:
        if event_name == TASK_FINISH:
            raise CallbackError("missing JobsDetail")
        # Other events are recorded as they are and never forwarded.
        return Callback(event_name=event_name, jobs=(), body_format=body_format)
    # An empty element (<JobsDetail/>, <CosHeaders/>) arrives as None: it holds nothing.
    items = [item for item in (details if isinstance(details, list) else [details]) if not _blank(item)]
    if not items:
        if event_name != TASK_FINISH:
            return Callback(event_name=event_name, jobs=(), body_format=body_format)
        raise CallbackError("JobsDetail is empty")
    if len(items) > MAX_JOBS_PER_CALLBACK:
        raise CallbackError(f"JobsDetail has {len(items)} jobs; at most {MAX_JOBS_PER_CALLBACK} are accepted")
    jobs: dict[str, Job] = {}
    for index, item in enumerate(items):
        job = parse_job(item, f"JobsDetail[{index}]")
        jobs.setdefault(job.job_id, job)
    return Callback(event_name=event_name, jobs=tuple(jobs.values()), body_format=body_format)


def parse_job(item: Any, where: str) -> Job:
    """Normalize one job container (from a callback or from DescribeMediaJob)."""
    if not isinstance(item, dict):
        raise CallbackError(f"{where} must be an object")
    job_id, tag, state = _identity(item, where, "Tag")
    operation = _container(item, "Operation", where)
    op_where = f"{where}.Operation"
    noise = _container(operation, "NoiseReduction", op_where)
    nr_where = f"{op_where}.NoiseReduction"
    return Job(
        job_id=job_id,
        tag=tag,
        state=state,
        code=_string(item, "Code", where),
        message=_string(item, "Message", where),
        creation_time=_string(item, "CreationTime", where),
        start_time=_string(item, "StartTime", where),
        end_time=_string(item, "EndTime", where),
        queue_id=_string(item, "QueueId", where),
        queue_type=_string(item, "QueueType", where),
        input=_location(item, "Input", "BucketId", where),
        output=_location(operation, "Output", "Bucket", op_where),
        user_data=_string(operation, "UserData", op_where),
        job_level=_string(operation, "JobLevel", op_where),
        template_id=_string(operation, "TemplateId", op_where),
        template_name=_string(operation, "TemplateName", op_where),
        format=_string(noise, "Format", nr_where),
        # CI's own examples spell it both ways.
        sample_rate=_string(noise, "SampleRate", nr_where) or _string(noise, "Samplerate", nr_where),
        cos_headers=_cos_headers(_container(item, "Input", where), f"{where}.Input"),
        workflow=_workflow(item, where),
        progress=_string(item, "Progress", where),
        sub_tag=_string(item, "SubTag", where),
        output_files=_output_files(operation, op_where),
        media_info=_media_summary(operation, op_where),
    )


def _string(container: dict[str, Any], key: str, where: str) -> str:
    return _text(container.get(key), f"{where}.{key}" if where else key)


def _text(value: Any, name: str) -> str:
    if value is None:  # absent, or an empty XML element
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise CallbackError(f"{name} must be a string")
    text = str(value)
    if len(text) > MAX_FIELD_LENGTH:
        raise CallbackError(f"{name} is longer than {MAX_FIELD_LENGTH} characters")
    if "\x00" in text:  # no CI field holds one, and PostgreSQL text columns cannot store it
        raise CallbackError(f"{name} contains a NUL character")
    if _SURROGATE.search(text):  # stored as is, it made the ledger's INSERT fail: a 500, not a 400
        raise CallbackError(f"{name} contains an unpaired surrogate")
    return text


def _blank(value: Any) -> bool:
    """An empty element: None in JSON or for ``<X/>``, only whitespace for an indented ``<X>\n</X>``."""
    return value is None or (isinstance(value, str) and not value.strip())


def _items(value: Any) -> list[Any]:
    """An element that may appear once or repeated (XML), or be one value or a list (JSON); blanks dropped."""
    return [item for item in (value if isinstance(value, list) else [value]) if not _blank(item)]


def _objects(container: dict[str, Any], key: str, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each element of the repeated ``key`` with where it is (``where.key[i]``); each must be an object."""
    for index, item in enumerate(_items(container.get(key))):
        inner = f"{where}.{key}[{index}]"
        if not isinstance(item, dict):
            raise CallbackError(f"{inner} must be an object")
        yield inner, item


def _container(container: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = container.get(key)
    if _blank(value):
        return {}
    if not isinstance(value, dict):
        raise CallbackError(f"{where}.{key} must be an object")
    return value


def _location(container: dict[str, Any], key: str, bucket_key: str, where: str) -> ObjectLocation | None:
    value = _container(container, key, where)
    if not value:
        return None
    inner = f"{where}.{key}"
    return ObjectLocation(
        bucket=_string(value, bucket_key, inner),
        region=_string(value, "Region", inner),
        key=_string(value, "Object", inner),
    )


def _cos_headers(input_: dict[str, Any], where: str) -> tuple[CosHeader, ...]:
    return tuple(
        CosHeader(key=_string(item, "Key", inner), value=_string(item, "Value", inner))
        for inner, item in _objects(input_, "CosHeaders", where)
    )


def _workflow(item: dict[str, Any], where: str) -> Workflow | None:
    value = _container(item, "Workflow", where)
    if not value:
        return None
    inner = f"{where}.Workflow"
    return Workflow(
        name=_string(value, "Name", inner),
        run_id=_string(value, "RunId", inner),
        workflow_id=_string(value, "WorkflowId", inner),
        workflow_name=_string(value, "WorkflowName", inner),
    )


def _output_files(operation: dict[str, Any], where: str) -> tuple[OutputFile, ...]:
    """``MediaResult/OutputFile``: one or several, each with one or several ``ObjectName``.

    Placeholders CI sends for outputs a job did not make (``<SpriteOutputFile>`` with empty
    fields, ``<ObjectPrefix/>``) are dropped, so what remains names objects that exist.
    """
    result = _container(operation, "MediaResult", where)
    files: list[OutputFile] = []
    names = 0
    for inner, item in _objects(result, "OutputFile", f"{where}.MediaResult"):
        found = OutputFile(
            bucket=_string(item, "Bucket", inner),
            region=_string(item, "Region", inner),
            object_names=tuple(
                _text(name, f"{inner}.ObjectName[{n}]") for n, name in enumerate(_items(item.get("ObjectName")))
            ),
            object_prefix=_string(item, "ObjectPrefix", inner),
            digests=_digests(item, inner),
        )
        names += len(found.object_names) + len(found.digests)
        if names > MAX_OUTPUT_NAMES:
            raise CallbackError(f"{where}.MediaResult lists more than {MAX_OUTPUT_NAMES} objects")
        if found.object_names or found.object_prefix:
            files.append(found)
    return tuple(files)


def _digests(output_file: dict[str, Any], where: str) -> tuple[FileDigest, ...]:
    digests = (
        FileDigest(_string(item, "ObjectName", inner), _string(item, "Md5", inner).lower())
        for inner, item in _objects(output_file, "Md5Info", where)
    )
    return tuple(digest for digest in digests if digest.object_name and digest.md5)


def _media_summary(operation: dict[str, Any], where: str) -> MediaSummary | None:
    """The parts of ``MediaInfo`` an audio receiver needs: the container, and the first audio stream."""
    info = _container(operation, "MediaInfo", where)
    if not info:
        return None
    inner = f"{where}.MediaInfo"
    container = _container(info, "Format", inner)
    streams = _container(info, "Stream", inner)
    audios = _items(streams.get("Audio"))
    audio = audios[0] if audios and isinstance(audios[0], dict) else {}
    at = f"{inner}.Stream.Audio"
    return MediaSummary(
        format_name=_string(container, "FormatName", f"{inner}.Format"),
        duration=_string(container, "Duration", f"{inner}.Format"),
        size=_string(container, "Size", f"{inner}.Format"),
        bitrate=_string(container, "Bitrate", f"{inner}.Format"),
        audio_codec=_string(audio, "CodecName", at),
        sample_rate=_string(audio, "SampleRate", at),
        channels=_string(audio, "Channel", at),
    )


def _identity(item: dict[str, Any], where: str, tag_key: str) -> tuple[str, str, str]:
    """A job's id, tag (under ``tag_key``) and state, each checked."""
    job_id = _string(item, "JobId", where)
    if not job_id:
        raise CallbackError(f"{where}: missing JobId")
    if not _JOB_ID.fullmatch(job_id):
        raise CallbackError(f"{where}.JobId must be 1 to 128 letters, digits, '-' or '_'")
    tag = _string(item, tag_key, where)
    if not tag:
        raise CallbackError(f"{where}: missing {tag_key}")
    state = _string(item, "State", where)
    if state not in JobState.__members__.values():
        raise CallbackError(f"{where}.State must be one of {_STATES}, not {state!r}")
    return job_id, tag, state


def _workflow_tasks(doc: dict[str, Any]) -> tuple[Job, ...]:
    """A workflow run's tasks as jobs: each names its JobId and Type; DescribeMediaJob supplies the rest.

    The run's input (``BucketId`` often empty, ``Object``) is each task's input. A task that
    never ran has no JobId: nothing to verify or deliver, so it is left out.
    """
    where = "WorkflowExecution"
    execution = _container(doc, where, "")
    run = Workflow(
        run_id=_string(execution, "RunId", where),
        workflow_id=_string(execution, "WorkflowId", where),
        workflow_name=_string(execution, "WorkflowName", where),
    )
    source = ObjectLocation(_string(execution, "BucketId", where), "", _string(execution, "Object", where))
    headers = _cos_headers(execution, where)
    if (count := len(_items(execution.get("Tasks")))) > MAX_JOBS_PER_CALLBACK:
        raise CallbackError(f"{where}.Tasks has {count} tasks; at most {MAX_JOBS_PER_CALLBACK} are accepted")
    jobs: dict[str, Job] = {}
    for inner, task in _objects(execution, "Tasks", where):
        if _blank(task.get("JobId")):
            continue
        job_id, tag, state = _identity(task, inner, "Type")
        job = Job(
            job_id=job_id,
            tag=tag,
            state=state,
            creation_time=_string(task, "CreateTime", inner),
            end_time=_string(task, "EndTime", inner),
            input=source if source.bucket or source.key else None,
            template_id=_string(task, "TemplateId", inner),
            template_name=_string(task, "TemplateName", inner),
            cos_headers=headers,
            workflow=replace(run, name=_string(task, "Name", inner)),
        )
        jobs.setdefault(job_id, job)
    return tuple(jobs.values())
