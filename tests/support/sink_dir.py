"""What a filesystem sink's directory holds, as its readers see it."""

from __future__ import annotations

import os
from pathlib import Path

from webhook.sinks.filesystem import PARTIAL_DIR


def written(directory: Path) -> list[str]:
    """The files delivered into ``directory``, sorted; fails if a write was left half done."""
    partial = directory / PARTIAL_DIR
    left = sorted(os.listdir(partial)) if partial.is_dir() else []
    assert left == [], f"temporary files left behind in {partial}: {left}"
    return sorted(name for name in os.listdir(directory) if name != PARTIAL_DIR)
