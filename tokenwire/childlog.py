"""The output of ``tokenwire dev``'s children: kept in a log file each, shown as it happens,
and read back for the one line that says why a child died.

How this works: every child writes stdout and stderr into one pipe; a thread per child copies
each line to the terminal and to ``<data dir>/logs/<name>.log`` and keeps the last lines in
memory. When the child dies, :func:`cause_of` picks the line a person needs from that tail: a
``refusing to start: …`` line, else a traceback's final exception line, else the last error
record of a JSON log, else the last line written.
"""

from __future__ import annotations

import collections
import re
import threading
from pathlib import Path
from typing import IO

import orjson

__all__ = ["ChildLog", "cause_of"]

#: Lines kept in memory for :func:`cause_of`.
TAIL_LINES = 200
_MAX_CAUSE = 300
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Group)\b(: .*)?$")


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MAX_CAUSE else line[: _MAX_CAUSE - 1] + "…"


def _error_record(line: str) -> str | None:
    """The message of a JSON log line at level error or critical, else None."""
    if not line.startswith("{"):
        return None
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict) or record.get("level") not in ("error", "critical"):
        return None
    message = str(record.get("msg", ""))
    exc = record.get("exc")
    if isinstance(exc, str) and exc.strip():
        message += f": {exc.strip().splitlines()[-1]}"
    elif record.get("error"):
        message += f": {record['error']}"
    return message


def cause_of(lines: list[str]) -> str:
    """The one line of a dead child's output that says why it died."""
    clean = [_ANSI.sub("", line).rstrip() for line in lines]
    clean = [line for line in clean if line.strip()]
    for line in reversed(clean):
        if line.startswith("refusing to start"):
            return _one_line(line)
    tracebacks = [i for i, line in enumerate(clean) if line.startswith("Traceback (most recent")]
    if tracebacks:
        after = clean[tracebacks[-1] + 1 :]
        for line in reversed(after):
            if _EXCEPTION.match(line):
                return _one_line(line)
    for line in reversed(clean):
        message = _error_record(line)
        if message is not None:
            return _one_line(message)
    return _one_line(clean[-1]) if clean else "it printed nothing"


class ChildLog:
    """Copies one child's output to the terminal and its log file, keeping the tail."""

    def __init__(self, path: Path, echo: IO[bytes] | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("wb")
        self._echo = echo
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def follow(self, pipe: IO[bytes]) -> None:
        """Start copying ``pipe`` (the child's stdout and stderr) until it closes."""
        self._thread = threading.Thread(
            target=self._copy, args=(pipe,), name=f"log:{self.path.stem}", daemon=True
        )
        self._thread.start()

    def _copy(self, pipe: IO[bytes]) -> None:
        with pipe:
            for raw in iter(pipe.readline, b""):
                with self._lock:
                    if not self._file.closed:
                        self._file.write(raw)
                        self._file.flush()
                    self._tail.append(raw.decode("utf-8", "replace"))
                if self._echo is not None:
                    try:
                        self._echo.write(raw)
                        self._echo.flush()
                    except (OSError, ValueError):  # the terminal went away: keep the file
                        self._echo = None

    def cause(self, wait_s: float = 2.0) -> str:
        """Why the child died: waits briefly for the rest of its output first."""
        if self._thread is not None:
            self._thread.join(wait_s)
        with self._lock:
            return cause_of(list(self._tail))

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(2.0)
        with self._lock:
            self._file.close()
