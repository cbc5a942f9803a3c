"""What a finished sandbox job reports beyond what was submitted, shaped as CI reports it.

CI resolves the placeholders of ``Output.Object`` when it writes the object but keeps the name as
submitted in ``Output``; the name it wrote is only in ``MediaResult/OutputFile``, with its MD5.
``MediaInfo`` is its probe of the output. Some callbacks leave locations out: the shapes below
reproduce what Tencent's own SDK examples print, so that cos-webhook is tested against them.
"""

from __future__ import annotations

import enum
import json
import posixpath
import re
import wave
from typing import IO, Any

import xmltodict

_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


class CallbackShape(enum.StrEnum):
    """How the sandbox writes a job's locations into its callbacks (DescribeMediaJob always has them)."""

    FULL = "full"  # every bucket and region stated
    EMPTY_BUCKETS = "empty-buckets"  # Input.BucketId, Output.Bucket and OutputFile.Bucket present but empty
    OBJECT_ONLY = "object-only"  # Input holds only Object; no bucket or region anywhere


def resolve_output(template: str, input_key: str, ext: str, number: int = 0) -> str:
    """The object CI writes for ``Output.Object`` ``template``: its placeholders filled in.

    ``${InputName}`` is the input's file name without its extension, ``${InputNameAndExt}`` with
    it, ``${InputPath}`` the input's folder, ``${ext}`` the output format's extension and
    ``${Number}`` the output's index. An unknown placeholder is left as it is, as CI does.
    """
    name = posixpath.basename(input_key)
    values = {
        "InputName": posixpath.splitext(name)[0],
        "InputNameAndExt": name,
        "InputPath": posixpath.dirname(input_key),
        "ext": ext,
        "Number": str(number),
    }
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def encoded(document: dict[str, Any], callback_format: str) -> tuple[bytes, str]:
    """A callback document as CI sends it: JSON, or XML under ``<Response>`` with ``<X/>`` for empty elements."""
    if callback_format == "json":
        return json.dumps(document).encode(), "application/json"
    return xmltodict.unparse({"Response": document}, short_empty_elements=True).encode(), "application/xml"


def media_info(wav: IO[bytes], size: int) -> dict[str, Any]:
    """``MediaInfo`` for a 16-bit PCM WAV of ``size`` bytes, in CI's units and number formats."""
    with wave.open(wav, "rb") as reader:
        rate, channels, frames = reader.getframerate(), reader.getnchannels(), reader.getnframes()
    duration = frames / rate if rate else 0.0
    bitrate = size * 8 / duration / 1000 if duration else 0.0
    return {
        "Format": {
            "Bitrate": f"{bitrate:.6f}",
            "Duration": f"{duration:.6f}",
            "FormatLongName": "WAV / WAVE (Waveform Audio)",
            "FormatName": "wav",
            "NumProgram": "0",
            "NumStream": "1",
            "Size": str(size),
            "StartTime": "0.000000",
        },
        "Stream": {
            "Audio": {
                "Bitrate": f"{rate * channels * 16 / 1000:.6f}",
                "Channel": str(channels),
                "ChannelLayout": "mono" if channels == 1 else "stereo" if channels == 2 else "",
                "CodecLongName": "PCM signed 16-bit little-endian",
                "CodecName": "pcm_s16le",
                "Duration": f"{duration:.6f}",
                "Index": "0",
                "SampleFmt": "s16",
                "SampleRate": str(rate),
                "StartTime": "0.000000",
            },
            "Subtitle": None,
            "Video": None,
        },
    }


def media_result(bucket: str, region: str, key: str, md5: str) -> dict[str, Any]:
    """``MediaResult``: the one object written, its MD5, and the empty sprite placeholder CI adds."""
    return {
        "OutputFile": {
            "Bucket": bucket,
            "Md5Info": {"Md5": md5, "ObjectName": key},
            "ObjectName": key,
            "ObjectPrefix": None,
            "Region": region,
            "SpriteOutputFile": {
                "Bucket": None,
                "Md5Info": None,
                "ObjectName": None,
                "ObjectPrefix": None,
                "Region": None,
            },
        }
    }


def shaped(detail: dict[str, Any], shape: CallbackShape) -> dict[str, Any]:
    """``detail`` (a ``JobsDetail`` as DescribeMediaJob answers it) as a callback of ``shape`` carries it."""
    if shape is CallbackShape.FULL:
        return detail
    shaped_detail = dict(detail)
    operation = dict(detail["Operation"])
    result = operation.get("MediaResult") or {}
    output_file = dict(result.get("OutputFile") or {})
    if shape is CallbackShape.EMPTY_BUCKETS:
        shaped_detail["Input"] = {**detail["Input"], "BucketId": ""}
        operation["Output"] = {**operation["Output"], "Bucket": ""}
        output_file["Bucket"] = ""
    else:
        shaped_detail["Input"] = {"Object": detail["Input"]["Object"]}
        operation["Output"] = {"Object": operation["Output"]["Object"]}
        output_file.pop("Bucket", None)
        output_file.pop("Region", None)
    if output_file:
        operation["MediaResult"] = {**result, "OutputFile": output_file}
    shaped_detail["Operation"] = operation
    return shaped_detail


def workflow_finish(run_id: str, bucket: str, input_key: str, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """A ``WorkflowFinish`` callback document for a run over ``input_key`` whose tasks were ``tasks``
    (``JobsDetail`` elements); like CI's examples, it leaves the run's ``BucketId`` empty."""
    return {
        "EventName": "WorkflowFinish",
        "WorkflowExecution": {
            "RunId": run_id,
            "BucketId": "",
            "Object": input_key,
            "WorkflowId": "w" + run_id[1:],
            "WorkflowName": f"sandbox-{bucket}",
            "CreateTime": tasks[0]["CreationTime"] if tasks else "",
            "State": "Success" if all(task["State"] == "Success" for task in tasks) else "Failed",
            "Tasks": [
                {
                    "Type": task["Tag"],
                    "CreateTime": task["CreationTime"],
                    "EndTime": task["EndTime"],
                    "State": task["State"],
                    "JobId": task["JobId"],
                    "Name": f"{task['Tag']}_1",
                    "TemplateId": "",
                    "TemplateName": "",
                }
                for task in tasks
            ],
        },
    }
