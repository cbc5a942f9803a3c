"""Callback bodies in the shapes CI really sends, beyond the documented sample.

Written for these tests, modelled on the structure of the callbacks printed in Tencent's own SDK
examples: a location left empty (``<BucketId></BucketId>``, ``<Bucket></Bucket>``), an ``Input``
holding only ``Object``, an ``Output.Object`` still carrying its ``${ext}`` template with the
resolved name only under ``MediaResult/OutputFile``, ``Md5Info``, ``MediaInfo``, repeated
``CosHeaders`` and ``WatermarkTemplateId``, ``Progress``, ``SubTag`` and ``Workflow``.
"""

from __future__ import annotations

import json
from typing import Any

import xmltodict

JOB_ID = "j5d0c3f7e9a2b11efb4c7525400f1e2d3"
BUCKET = "voice-1300000001"
REGION = "ap-shanghai"
OUTPUT_MD5 = "5eb63bbbe01eeed093cb22bb8f5acdc3"

MEDIA_INFO: dict[str, Any] = {
    "Format": {
        "Bitrate": "256.012000",
        "Duration": "4.000000",
        "FormatLongName": "WAV / WAVE (Waveform Audio)",
        "FormatName": "wav",
        "NumProgram": "0",
        "NumStream": "1",
        "Size": "128044",
        "StartTime": "0.000000",
    },
    "Stream": {
        "Audio": {
            "Bitrate": "256.000000",
            "Channel": "1",
            "ChannelLayout": "mono",
            "CodecName": "pcm_s16le",
            "Duration": "4.000000",
            "Index": "0",
            "SampleFmt": "s16",
            "SampleRate": "16000",
        },
        "Subtitle": None,
        "Video": None,
    },
}


def detail(**changes: Any) -> dict[str, Any]:
    """A finished NoiseReduction job with every part CI adds around what was submitted."""
    base: dict[str, Any] = {
        "Code": "Success",
        "CreationTime": "2024-03-05T09:12:40+0800",
        "EndTime": "2024-03-05T09:12:47+0800",
        "Input": {
            "BucketId": BUCKET,
            "Object": "calls/2024/0305/raw.wav",
            "Region": REGION,
            "CosHeaders": [
                {"Key": "Content-Type", "Value": "audio/wav"},
                {"Key": "x-cos-meta-call", "Value": "c-77"},
                {"Key": "EventName", "Value": "cos:ObjectCreated:Put"},
            ],
        },
        "JobId": JOB_ID,
        "Message": None,
        "Operation": {
            "MediaInfo": MEDIA_INFO,
            "MediaResult": {
                "OutputFile": {
                    "Bucket": BUCKET,
                    "Md5Info": {"Md5": OUTPUT_MD5, "ObjectName": "clean/raw.wav"},
                    "ObjectName": "clean/raw.wav",
                    "ObjectPrefix": None,
                    "Region": REGION,
                    "SpriteOutputFile": {"Bucket": None, "Md5Info": None, "ObjectName": None, "Region": None},
                }
            },
            "NoiseReduction": {"Format": "wav", "Samplerate": "16000"},
            "Output": {"Bucket": BUCKET, "Object": "clean/${InputName}.${ext}", "Region": REGION},
            "TemplateId": "t1c9e0d6b3a2f44e8b8e1f2a3b4c5d6e7",
            "TemplateName": "denoise-16k",
            "UserData": "call c-77",
            "JobLevel": "0",
            "WatermarkTemplateId": ["t1aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "t1bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"],
        },
        "QueueId": "p8e2f1c0b9a8d47c6b5a4f3e2d1c0b9a8",
        "QueueType": "Speeching",
        "StartTime": "2024-03-05T09:12:41+0800",
        "State": "Success",
        "Progress": "100",
        "SubTag": "NoiseReduction",
        "Tag": "NoiseReduction",
        "Workflow": {
            "Name": "NoiseReduction_1709600000000",
            "RunId": "i3f2e1d0c9b8a11efa1b2525400c3d4e5",
            "WorkflowId": "w4c3b2a19f8e74d6c5b4a39281706f5e4",
            "WorkflowName": "calls-denoise",
        },
    }
    return _merge(base, changes)


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        elif value is _DROP:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


_DROP = object()
DROP: Any = _DROP  # a change that removes the key


def empty_locations() -> dict[str, Any]:
    """Every bucket CI left empty, as in its 2021 examples: input, output and the result file."""
    return detail(
        Input={"BucketId": ""},
        Operation={"Output": {"Bucket": ""}, "MediaResult": {"OutputFile": {"Bucket": ""}}},
    )


def object_only_input() -> dict[str, Any]:
    """``Input`` with nothing but ``Object``: no bucket, no region, no headers."""
    return detail(Input={"BucketId": DROP, "Region": DROP, "CosHeaders": DROP})


def several_files() -> dict[str, Any]:
    """One job that wrote two objects, named under one ``OutputFile``, each with its MD5."""
    return detail(
        Operation={
            "Output": {"Object": "clean/part-${Number}.wav"},
            "MediaResult": {
                "OutputFile": {
                    "ObjectName": ["clean/part-1.wav", "clean/part-2.wav"],
                    "Md5Info": [
                        {"Md5": OUTPUT_MD5, "ObjectName": "clean/part-1.wav"},
                        {"Md5": "7d793037a0760186574b0282f2f435e7", "ObjectName": "clean/part-2.wav"},
                    ],
                }
            },
        }
    )


def as_xml(job: dict[str, Any], event: str = "TaskFinish") -> bytes:
    """The callback as CI's XML: an element per key, repeated for a list, ``<X/>`` for None."""
    return xmltodict.unparse(
        {"Response": {"EventName": event, "JobsDetail": job}}, full_document=False, short_empty_elements=True
    ).encode()


def as_json(job: dict[str, Any], event: str = "TaskFinish", *, numbers: bool = False) -> bytes:
    """The callback as CI's JSON; ``numbers`` writes numeric fields as JSON numbers, as some answers do."""
    if numbers:
        job = _merge(job, {"Progress": 100, "Operation": {"MediaInfo": {"Format": {"Size": 128044}}}})
    return json.dumps({"EventName": event, "JobsDetail": job}).encode()


WORKFLOW_JOB_ID = "j9a8b7c6d5e4f11efa0b1525400d2e3f4"


def workflow_execution(*tasks: dict[str, Any]) -> dict[str, Any]:
    """A ``WorkflowFinish``'s ``WorkflowExecution``: the run's input (bucket left empty) and its tasks."""
    return {
        "RunId": "i6b5a4c3d2e1f11ef9a8b525400e1f2a3",
        "BucketId": "",
        "Object": "calls/2024/0305/raw.wav",
        "CosHeaders": [{"Key": "Content-Type", "Value": "audio/wav"}],
        "WorkflowId": "w4c3b2a19f8e74d6c5b4a39281706f5e4",
        "WorkflowName": "calls-denoise",
        "CreateTime": "2024-03-05 09:12:39+0800",
        "State": "Success",
        "Tasks": list(tasks)
        or [
            workflow_task(),
            workflow_task(Type="Snapshot", JobId="j1111111111111111111111111111111a", Name="Snapshot_1"),
        ],
    }


def workflow_task(**changes: Any) -> dict[str, Any]:
    task = {
        "Type": "NoiseReduction",
        "CreateTime": "2024-03-05 09:12:40+0800",
        "EndTime": "2024-03-05 09:12:47+0800",
        "State": "Success",
        "JobId": WORKFLOW_JOB_ID,
        "Name": "NoiseReduction_1709600000000",
        "TemplateId": "t1c9e0d6b3a2f44e8b8e1f2a3b4c5d6e7",
        "TemplateName": "denoise-16k",
    }
    return task | changes


def workflow_xml(execution: dict[str, Any]) -> bytes:
    body = {"Response": {"EventName": "WorkflowFinish", "WorkflowExecution": execution}}
    return xmltodict.unparse(body, full_document=False, short_empty_elements=True).encode()


def workflow_json(execution: dict[str, Any]) -> bytes:
    return json.dumps({"EventName": "WorkflowFinish", "WorkflowExecution": execution}).encode()
