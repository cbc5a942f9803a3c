"""What CI reports a job made: ``MediaResult`` (the objects it wrote, with their MD5s) and
``MediaInfo`` (its probe of the output) (pure)."""

from __future__ import annotations

from typing import Any

from webhook.intake.fields import CallbackError, as_text, each_object, read_object, read_text, repeated
from webhook.models import FileDigest, MediaSummary, OutputFile

MAX_OUTPUT_NAMES = 1000  # object names (and their digests) one job's MediaResult may list


def output_files(operation: dict[str, Any], where: str) -> tuple[OutputFile, ...]:
    """``MediaResult/OutputFile``: one or several, each with one or several ``ObjectName``.

    Placeholders CI sends for outputs a job did not make (``<SpriteOutputFile>`` with empty
    fields, ``<ObjectPrefix/>``) are dropped, so what remains names objects that exist.
    """
    result = read_object(operation, "MediaResult", where)
    files: list[OutputFile] = []
    names = 0
    for inner, item in each_object(result, "OutputFile", f"{where}.MediaResult"):
        found = OutputFile(
            bucket=read_text(item, "Bucket", inner),
            region=read_text(item, "Region", inner),
            object_names=tuple(
                as_text(name, f"{inner}.ObjectName[{n}]") for n, name in enumerate(repeated(item.get("ObjectName")))
            ),
            object_prefix=read_text(item, "ObjectPrefix", inner),
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
        FileDigest(read_text(item, "ObjectName", inner), read_text(item, "Md5", inner).lower())
        for inner, item in each_object(output_file, "Md5Info", where)
    )
    return tuple(digest for digest in digests if digest.object_name and digest.md5)


def media_summary(operation: dict[str, Any], where: str) -> MediaSummary | None:
    """The parts of ``MediaInfo`` an audio receiver needs: the container, and the first audio stream."""
    info = read_object(operation, "MediaInfo", where)
    if not info:
        return None
    inner = f"{where}.MediaInfo"
    container = read_object(info, "Format", inner)
    streams = read_object(info, "Stream", inner)
    audios = repeated(streams.get("Audio"))
    audio = audios[0] if audios and isinstance(audios[0], dict) else {}
    at = f"{inner}.Stream.Audio"
    return MediaSummary(
        format_name=read_text(container, "FormatName", f"{inner}.Format"),
        duration=read_text(container, "Duration", f"{inner}.Format"),
        size=read_text(container, "Size", f"{inner}.Format"),
        bitrate=read_text(container, "Bitrate", f"{inner}.Format"),
        audio_codec=read_text(audio, "CodecName", at),
        sample_rate=read_text(audio, "SampleRate", at),
        channels=read_text(audio, "Channel", at),
    )
