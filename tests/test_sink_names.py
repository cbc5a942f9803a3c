"""The storage sinks' one naming rule: a job's audio files and any job's metadata document never share a name.

A job's one file is ``<job_id><ext>``; each of several is ``<job_id>.<n><ext>``.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webhook.models import FetchedFile, Job, JobFile, ObjectLocation
from webhook.sinks.common import audio_name, document_name

PREFIX = "denoised/"
# What the callback parser lets through (webhook/callback.py): no dot, so the name says where the id ends.
job_ids = st.from_regex(r"[A-Za-z0-9_-]{1,128}", fullmatch=True)
# Arbitrary text, and keys built to look like the document's name or to end in something near it.
suffixes = st.sampled_from([".json", ".JSON", ".event", ".event.json", ".Event.Json", ".json.event", ".", ""])
keys = (
    st.text()
    | st.builds(str.__add__, st.text(), suffixes)
    | st.from_regex(r"[a-z/.]{0,12}\.[A-Za-z0-9.]{0,12}", fullmatch=True)
)
prefixes = st.sampled_from(["", PREFIX, "a.event.json/", "x."])


def job(job_id: str = "j1", key: str | None = "out/a.wav") -> Job:
    output = ObjectLocation("audio-1250000000", "ap-guangzhou", key) if key is not None else None
    return Job(job_id=job_id, tag="NoiseReduction", state="Success", output=output)


@pytest.mark.parametrize(
    ("key", "audio"),
    [
        ("out/a.wav", "j1.wav"),
        ("out/denoised.json", "j1.json"),
        ("out/denoised.JSON", "j1.JSON"),
        ("out/denoised.event", "j1.event"),
        ("out/denoised.event.json", "j1.json"),
        ("out/denoised.json.event", "j1.event"),
        ("out/.event.json", "j1.json"),  # the basename's last suffix, even after a leading dot
        ("out/.json", "j1.bin"),  # a dotfile's name is not a suffix
        ("out/denoised.", "j1.bin"),
        ("out/denoised", "j1.bin"),
        ("out/dir/", "j1.bin"),
        ("", "j1.bin"),
        ("out/a.toolong123", "j1.bin"),
        ("out/a.js on", "j1.bin"),
        ("out/a.json\n", "j1.bin"),
        ("out/a.\uff4a\uff53\uff4f\uff4e", "j1.bin"),  # fullwidth "json" is not ASCII
        ("../../etc/passwd.json", "j1.json"),
    ],
)
def test_audio_keeps_a_plain_extension_and_the_document_is_event_json(key: str, audio: str) -> None:
    assert audio_name(PREFIX, job(key=key)) == PREFIX + audio
    assert document_name(PREFIX, job(key=key)) == PREFIX + "j1.event.json"


def test_a_job_without_output_still_has_two_names() -> None:
    assert (audio_name("", job(key=None)), document_name("", job(key=None))) == ("j1.bin", "j1.event.json")


@given(first=job_ids, second=job_ids, first_key=keys, second_key=keys, prefix=prefixes)
def test_no_audio_name_is_any_document_name(
    first: str, second: str, first_key: str, second_key: str, prefix: str
) -> None:
    a, b = job(first, first_key), job(second, second_key)
    audio, document = audio_name(prefix, a), document_name(prefix, b)
    # casefold: a case-insensitive store (or a macOS/Windows disk) must not see one name either.
    assert audio.casefold() != document.casefold()
    assert audio.startswith(prefix + first + ".")
    assert not audio.removeprefix(prefix).casefold().endswith(".event.json")
    if first != second:
        assert audio != audio_name(prefix, job(second, first_key))
        assert document_name(prefix, a) != document


FETCHED = FetchedFile(path=None, size=0, crc64="", content_type="audio/wav")


def job_file(key: str, number: int = 1, count: int = 1) -> JobFile:
    return JobFile(ObjectLocation("audio-1250000000", "ap-guangzhou", key), FETCHED, number, count)


def test_one_file_keeps_the_name_it_always_had_and_several_are_numbered_from_one() -> None:
    one = job(key="out/a.wav")
    assert audio_name(PREFIX, one, job_file("out/a.wav")) == audio_name(PREFIX, one) == PREFIX + "j1.wav"
    several = [job_file("out/a-1.wav", 1, 3), job_file("out/a-2.json", 2, 3), job_file("out/a-3", 3, 3)]
    assert [audio_name(PREFIX, one, file) for file in several] == [
        PREFIX + "j1.1.wav",
        PREFIX + "j1.2.json",  # each file's own extension
        PREFIX + "j1.3.bin",
    ]


@given(
    first=job_ids,
    second=job_ids,
    first_keys=st.lists(keys, min_size=2, max_size=4),
    second_key=keys,
    count=st.integers(1, 4),
    prefix=prefixes,
)
def test_no_file_of_several_is_a_document_another_job_s_file_or_another_file_of_its_job(
    first: str, second: str, first_keys: list[str], second_key: str, count: int, prefix: str
) -> None:
    files = [job_file(key, n, len(first_keys)) for n, key in enumerate(first_keys, start=1)]
    names = [audio_name(prefix, job(first), file) for file in files]
    # casefold: a case-insensitive store (or a macOS/Windows disk) must not see one name either.
    assert len({name.casefold() for name in names}) == len(names)
    assert document_name(prefix, job(second)).casefold() not in {name.casefold() for name in names}
    assert all(name.startswith(prefix + first + ".") for name in names)
    if first != second:  # compared as they are: job ids are case-sensitive
        theirs = {audio_name(prefix, job(second), job_file(second_key, n, count)) for n in range(1, count + 1)}
        assert theirs.isdisjoint(names)
