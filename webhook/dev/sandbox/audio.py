"""Test audio: a noisy WAV generator, and the sandbox's stand-in for CI noise reduction.

Only the standard library (``wave``, ``array``): 16-bit PCM WAV in, 16-bit PCM WAV out.
"""

from __future__ import annotations

import math
import random
import sys
import wave
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import IO

_FRAMES_PER_BLOCK = 64 * 1024
_MIN_WINDOW = 4  # samples averaged even without downsampling, so the output is always smoother


class AudioError(Exception):
    """The input is not audio the sandbox can process."""


def noisy_wav(path: Path, seconds: float, sample_rate: int = 44100, *, frequency: int = 440, seed: int = 0) -> Path:
    """Write a 16-bit mono WAV of ``seconds``: a sine tone plus deterministic Gaussian noise.

    One second of signal is computed once and written over and over, which makes even a 200 MiB
    file a matter of disk speed; an integer ``frequency`` fits whole cycles in a second, so the
    repeats join without a click.
    """
    rng = random.Random(seed)
    block = array(
        "h",
        (
            _clip(8000 * math.sin(2 * math.pi * frequency * i / sample_rate) + rng.gauss(0, 2000))
            for i in range(sample_rate)
        ),
    )
    data = _to_bytes(block)
    frames = round(seconds * sample_rate)
    with path.open("wb") as file, wave.open(file, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        # Known up front, so the header is right from the start and never patched.
        out.setnframes(frames)
        whole, rest = divmod(frames, sample_rate)
        for _ in range(whole):
            out.writeframesraw(data)
        out.writeframesraw(data[: rest * 2])
    return path


def reduce_noise(source: IO[bytes], target: IO[bytes], sample_rate: int | None) -> None:
    """Write ``source`` to ``target`` low-passed and resampled to ``sample_rate`` (None: keep it).

    A moving average stands in for noise reduction; linear interpolation does the resampling.
    Both stream block by block; ``target`` must be seekable (the WAV header is written last).
    """
    try:
        with wave.open(source, "rb") as reader:
            _reduce(reader, target, sample_rate)
    except (wave.Error, EOFError) as exc:
        raise AudioError(f"the input is not a PCM WAV file ({exc})") from None


def split_wav(source: IO[bytes], targets: Sequence[IO[bytes]]) -> None:
    """Write the frames of the WAV ``source`` into ``targets`` in turn, each a WAV of its own of
    about an equal share (the last takes what remains); ``targets`` must be seekable."""
    with wave.open(source, "rb") as reader:
        params, frame_size = reader.getparams(), reader.getsampwidth() * reader.getnchannels()
        share = -(-reader.getnframes() // len(targets))
        for target in targets:
            # The header's frame count is patched when the writer closes (the target stays open).
            with wave.open(target, "wb") as writer:
                writer.setparams(params)
                left = share
                while left and (data := reader.readframes(min(_FRAMES_PER_BLOCK, left))):
                    writer.writeframesraw(data)
                    left -= len(data) // frame_size


def _reduce(reader: wave.Wave_read, target: IO[bytes], sample_rate: int | None) -> None:
    if reader.getsampwidth() != 2:
        raise AudioError(f"the input has {8 * reader.getsampwidth()}-bit samples; only 16-bit PCM is supported")
    channels, in_rate = reader.getnchannels(), reader.getframerate()
    out_rate = sample_rate or in_rate
    resamplers = [_Resampler(in_rate, out_rate) for _ in range(channels)]
    with wave.open(target, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(2)
        writer.setframerate(out_rate)
        while data := reader.readframes(_FRAMES_PER_BLOCK):
            samples = _from_bytes(data)
            writer.writeframesraw(_interleave([r.feed(samples[c::channels]) for c, r in enumerate(resamplers)]))
        writer.writeframesraw(_interleave([r.feed(array("h"), last=True) for r in resamplers]))


class _Resampler:
    """One channel: output sample ``i`` sits at input position ``i * in_rate / out_rate``.

    Its value interpolates linearly between the moving averages that start at the two input
    samples around that position. The window widens with the downsampling ratio, so it also
    keeps frequencies above the new Nyquist limit from folding back in.
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self._in_rate = in_rate
        self._out_rate = out_rate
        self._window = max(_MIN_WINDOW, -(-in_rate // out_rate))
        self._pending = array("h")  # input samples not yet consumed
        self._offset = 0  # input index of _pending[0]
        self._next = 0  # index of the next output sample

    def feed(self, samples: array[int], *, last: bool = False) -> array[int]:
        """Take more input; return every output sample it completes (all of them when ``last``)."""
        pending, window = self._pending, self._window
        pending.extend(samples)
        end = self._offset + len(pending)
        if last and pending:
            # Hold the final sample so the tail still has whole windows to average.
            pending.extend(pending[-1:] * window)
        out = array("h")
        while True:
            k, remainder = divmod(self._next * self._in_rate, self._out_rate)
            j = k - self._offset
            if k >= end or j + window >= len(pending):
                break
            shared = sum(pending[j + 1 : j + window])
            before = (pending[j] + shared) / window
            after = (shared + pending[j + window]) / window
            out.append(round(before + (after - before) * remainder / self._out_rate))
            self._next += 1
        consumed = min(k, end) - self._offset
        del pending[:consumed]
        self._offset += consumed
        return out


def _interleave(channels: list[array[int]]) -> bytes:
    if len(channels) == 1:
        return _to_bytes(channels[0])
    frames = array("h", [0]) * (len(channels) * len(channels[0]))
    for index, samples in enumerate(channels):
        frames[index :: len(channels)] = samples
    return _to_bytes(frames)


def _clip(value: float) -> int:
    return max(-32768, min(32767, round(value)))


# WAV samples are little-endian; array uses the machine's byte order.
def _from_bytes(data: bytes) -> array[int]:
    samples = array("h", data)
    if sys.byteorder == "big":
        samples.byteswap()
    return samples


def _to_bytes(samples: array[int]) -> bytes:
    if sys.byteorder == "big":
        samples = array("h", samples)
        samples.byteswap()
    return samples.tobytes()
