"""What a run prints, and where everything else goes.

A run prints its folder, the labeling page's URL, one progress line per iteration and a
summary: `note()` (stderr) and `progress()` (stdout). Under `quiet(log_path)` -- the CLI's
default -- everything else the process writes goes to a log file in the run folder instead of
the terminal: Ray's, RLlib's and Serve's Python logging, warnings, and the lines Ray's C++
core writes straight to the process's stderr. That takes the file descriptors themselves
(1 and 2), the only way to catch the C++ lines; this module keeps its own copies of the
terminal's.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

_terminal: dict[str, object] = {}  # "out" / "err" -> the terminal while output is redirected
_log: list[Path] = []  # the log file of the current (or last) quiet block


def note(msg: str) -> None:
    """A line for the user (the run folder, the labeling URL, a stage starting)."""
    print(msg, file=_terminal.get("err") or sys.stderr, flush=True)


def progress(line: str) -> None:
    """One progress line per iteration."""
    print(line, file=_terminal.get("out") or sys.stdout, flush=True)


def last_log() -> Path | None:
    return _log[-1] if _log else None


def _own_copy(stream, fd: int):
    """A stream to the terminal that survives redirecting `fd`: a duplicate of the fd where
    `stream` writes to it; `stream` itself where it is something else (a test's capture)."""
    try:
        if stream.fileno() == fd:
            return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
    except (AttributeError, OSError, ValueError):
        pass
    return stream


@contextmanager
def quiet(log_path: str | Path, enabled: bool = True):
    """Send the process's stdout and stderr to `log_path` (appended) while the block runs;
    `note` and `progress` still reach the terminal. An exception leaving the block is written
    to the log with its traceback first. `enabled=False` changes nothing (`--verbose`)."""
    if not enabled or _terminal:
        yield
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for s in (sys.stdout, sys.stderr):
        s.flush()
    _terminal["out"] = _own_copy(sys.stdout, 1)
    _terminal["err"] = _own_copy(sys.stderr, 2)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    log = open(log_path, "a", buffering=1)
    log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
    log.flush()
    for fd in (1, 2):
        os.dup2(log.fileno(), fd)
    _log.append(log_path)
    try:
        yield
    except BaseException:
        traceback.print_exc(file=log)
        raise
    finally:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except (OSError, ValueError):
                pass
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        log.close()
        for key in ("out", "err"):
            stream = _terminal.pop(key)
            if stream not in (sys.stdout, sys.stderr):
                stream.close()
