"""The status line of long commands: drawn on a terminal only, at most every INTERVAL, cleared at the end."""

from __future__ import annotations

import io

from webhook.cli.progress import INTERVAL, Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_terminal_sees_the_latest_text_rewritten_in_place_then_cleared() -> None:
    screen, clock = Terminal(), Clock()
    with Progress(screen, clock) as show:
        show("10 listed")
        clock.now += INTERVAL / 2
        show("20 listed")  # too soon: not drawn
        clock.now += INTERVAL
        show("9 done")  # shorter: padded over the longer text
    assert screen.getvalue() == "\r10 listed" + "\r9 done   " + "\r      \r"


def test_anything_else_gets_nothing() -> None:
    piped = io.StringIO()
    with Progress(piped) as show:
        show("10 listed")
    assert piped.getvalue() == ""


def test_nothing_drawn_nothing_cleared() -> None:
    screen = Terminal()
    with Progress(screen):
        pass
    assert screen.getvalue() == ""
