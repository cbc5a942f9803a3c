"""Parse a CI callback body (XML or JSON, every documented shape) into a :class:`Callback`.

Pure: no I/O. Every problem raises :class:`CallbackError` with a message that names it,
so the endpoint can answer a 4xx without storing anything.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any
from xml.parsers import expat
from xml.parsers.expat import ExpatError

import xmltodict

from webhook.intake.fields import (
    CallbackError,
    each_object,
    is_blank,
    read_identity,
    read_location,
    read_object,
    read_text,
    repeated,
)
from webhook.intake.outputs import media_summary, output_files
from webhook.models import Callback, CosHeader, Job, ObjectLocation, Workflow

__all__ = ["MAX_JOBS_PER_CALLBACK", "MAX_XML_DEPTH", "Callback", "CallbackError", "parse_callback", "parse_job"]

TASK_FINISH = "TaskFinish"
WORKFLOW_FINISH = "WorkflowFinish"
MAX_JOBS_PER_CALLBACK = 100
# CI's deepest element is about 7 levels down (Response/JobsDetail/Operation/MediaResult/…).
MAX_XML_DEPTH = 100
# Expat expands internal entities before any handler sees them; refusing the declaration
# itself is the only way to rule out entity-expansion bombs and external entities.
_DTD = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_DTD_REFUSED = "XML with a DOCTYPE or entity declaration is not accepted"


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
    event_name = read_text(doc, "EventName", "")
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
    items = [item for item in (details if isinstance(details, list) else [details]) if not is_blank(item)]
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
    job_id, tag, state = read_identity(item, where, "Tag")
    operation = read_object(item, "Operation", where)
    op_where = f"{where}.Operation"
    noise = read_object(operation, "NoiseReduction", op_where)
    nr_where = f"{op_where}.NoiseReduction"
    return Job(
        job_id=job_id,
        tag=tag,
        state=state,
        code=read_text(item, "Code", where),
        message=read_text(item, "Message", where),
        creation_time=read_text(item, "CreationTime", where),
        start_time=read_text(item, "StartTime", where),
        end_time=read_text(item, "EndTime", where),
        queue_id=read_text(item, "QueueId", where),
        queue_type=read_text(item, "QueueType", where),
        input=read_location(item, "Input", "BucketId", where),
        output=read_location(operation, "Output", "Bucket", op_where),
        user_data=read_text(operation, "UserData", op_where),
        job_level=read_text(operation, "JobLevel", op_where),
        template_id=read_text(operation, "TemplateId", op_where),
        template_name=read_text(operation, "TemplateName", op_where),
        format=read_text(noise, "Format", nr_where),
        # CI's own examples spell it both ways.
        sample_rate=read_text(noise, "SampleRate", nr_where) or read_text(noise, "Samplerate", nr_where),
        cos_headers=_cos_headers(read_object(item, "Input", where), f"{where}.Input"),
        workflow=_workflow(item, where),
        progress=read_text(item, "Progress", where),
        sub_tag=read_text(item, "SubTag", where),
        output_files=output_files(operation, op_where),
        media_info=media_summary(operation, op_where),
    )


def _cos_headers(input_: dict[str, Any], where: str) -> tuple[CosHeader, ...]:
    return tuple(
        CosHeader(key=read_text(item, "Key", inner), value=read_text(item, "Value", inner))
        for inner, item in each_object(input_, "CosHeaders", where)
    )


def _workflow(item: dict[str, Any], where: str) -> Workflow | None:
    value = read_object(item, "Workflow", where)
    if not value:
        return None
    inner = f"{where}.Workflow"
    return Workflow(
        name=read_text(value, "Name", inner),
        run_id=read_text(value, "RunId", inner),
        workflow_id=read_text(value, "WorkflowId", inner),
        workflow_name=read_text(value, "WorkflowName", inner),
    )


def _workflow_tasks(doc: dict[str, Any]) -> tuple[Job, ...]:
    """A workflow run's tasks as jobs: each names its JobId and Type; DescribeMediaJob supplies the rest.

    The run's input (``BucketId`` often empty, ``Object``) is each task's input. A task that
    never ran has no JobId: nothing to verify or deliver, so it is left out.
    """
    where = "WorkflowExecution"
    execution = read_object(doc, where, "")
    run = Workflow(
        run_id=read_text(execution, "RunId", where),
        workflow_id=read_text(execution, "WorkflowId", where),
        workflow_name=read_text(execution, "WorkflowName", where),
    )
    source = ObjectLocation(read_text(execution, "BucketId", where), "", read_text(execution, "Object", where))
    headers = _cos_headers(execution, where)
    if (count := len(repeated(execution.get("Tasks")))) > MAX_JOBS_PER_CALLBACK:
        raise CallbackError(f"{where}.Tasks has {count} tasks; at most {MAX_JOBS_PER_CALLBACK} are accepted")
    jobs: dict[str, Job] = {}
    for inner, task in each_object(execution, "Tasks", where):
        if is_blank(task.get("JobId")):
            continue
        job_id, tag, state = read_identity(task, inner, "Type")
        job = Job(
            job_id=job_id,
            tag=tag,
            state=state,
            creation_time=read_text(task, "CreateTime", inner),
            end_time=read_text(task, "EndTime", inner),
            input=source if source.bucket or source.key else None,
            template_id=read_text(task, "TemplateId", inner),
            template_name=read_text(task, "TemplateName", inner),
            cos_headers=headers,
            workflow=replace(run, name=read_text(task, "Name", inner)),
        )
        jobs.setdefault(job_id, job)
    return tuple(jobs.values())
