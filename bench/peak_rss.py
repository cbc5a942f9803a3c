"""Run a command as a child of this small process; write its exit code, peak RSS and wall time as JSON.

    python bench/peak_rss.py RESULT.json COMMAND [ARG...]

The peak RSS is ``ru_maxrss`` from ``wait4()`` on the command's process. Why not call ``wait4()``
from the benchmark itself: on Linux a process's ``ru_maxrss`` starts at the RSS of the process it
was forked (or vforked) from, because ``exec`` carries the old address space's high-water mark
over. A worker started directly by the benchmark, which holds a sandbox, a web app and an SDK
client, would report at least the benchmark's own peak. Forked from this bare interpreter (about
10 MiB), the command's ``ru_maxrss`` is its own.

This process exits 0 once the result is written, whatever the command's exit code.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    result_path, command = argv[0], argv[1:]
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child becomes the command
        try:
            os.execvp(command[0], command)
        except OSError as exc:
            print(f"cannot run {command[0]}: {exc}", file=sys.stderr)
        os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    wall_seconds = time.monotonic() - started
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    peak_rss_bytes = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    result = {
        "exit_code": os.waitstatus_to_exitcode(status),
        "peak_rss_bytes": peak_rss_bytes,
        "wall_seconds": wall_seconds,
    }
    with open(result_path, "w") as out:
        json.dump(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
