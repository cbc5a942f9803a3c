"""A status line for long commands (reconcile, prune): shown on a terminal only, rewritten in place.

Piped or captured output stays exactly the command's result lines: a script reading them never
sees progress text.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

INTERVAL = 0.25  # seconds between redraws: fast enough to look alive, cheap on a slow terminal


class Progress:
    """``with Progress() as show: show("12 listed")``: the latest text on one line of stderr, cleared at the end."""

    def __init__(self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.shown = self.stream.isatty()
        self._clock = clock
        self._drawn_at: float | None = None
        self._width = 0

    def __call__(self, text: str) -> None:
        if not self.shown:
            return
        now = self._clock()
        if self._drawn_at is not None and now - self._drawn_at < INTERVAL:
            return
        self._drawn_at = now
        self._draw(text)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.shown and self._width:
            self._draw("")  # the result lines that follow start on a clean line

    def _draw(self, text: str) -> None:
        # Padded to the previous text's width: a shorter line leaves none of the longer one behind.
        self.stream.write("\r" + text.ljust(self._width) + ("\r" if not text else ""))
        self.stream.flush()
        self._width = len(text)
