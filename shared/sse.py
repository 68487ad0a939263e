# How this works
# --------------
# SSEParser is a push parser for a text/event-stream body (WHATWG HTML, "Parsing an event
# stream"). The caller feeds raw bytes as they arrive and gets back the events those bytes
# completed; the parser never reads, awaits or sleeps.
#
# 1. Lines. Only the new chunk is split (bytes.splitlines breaks on b"\r\n", b"\r" and b"\n"
#    only), so no byte is scanned twice. The unterminated tail is kept in `_partial` and glued
#    to the first line of the next chunk. A chunk ending in b"\r" ends that line at once and
#    sets `_skip_lf`, so a b"\n" opening the next chunk is taken as the rest of that b"\r\n"
#    and not as an empty line.
# 2. Decoding. UTF-8 never uses the bytes 0x0A and 0x0D inside a multi-byte character, so
#    splitting bytes on them is safe; values are decoded (errors="replace") only once a line
#    (for data: once an event) is complete. One UTF-8 BOM is dropped from the first line.
# 3. Fields. Each line updates the buffers of the event being built (data lines, event type,
#    retry) or the last event id, which outlives events as in the spec. A blank line turns
#    those buffers into an SSEEvent and resets them.
# 4. Limits. A line or an event's data longer than max_event_bytes raises SSEProtocolError,
#    the only exception this module raises on any input; the parser is unusable afterwards.

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

__all__ = ["SSEEvent", "SSEParser", "SSEProtocolError"]

_BOM = b"\xef\xbb\xbf"
_CR = 0x0D
_LF = 0x0A
# A retry value with more significant digits than this is ignored (int() would refuse
# very long digit strings, and no client waits 10**18 ms).
_MAX_RETRY_DIGITS = 18


class SSEProtocolError(ValueError):
    """The event stream broke a limit or the parser was used after EOF or after an error.

    Raised by SSEParser for an over-long line or event, and for feeding a closed parser.
    It is the only exception the parser raises, whatever bytes it is fed.
    """


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched server-sent event.

    ``event`` is the raw ``event:`` field value, ``""`` when the block had none (a browser
    would report ``"message"``). ``data`` is the block's data lines joined with ``"\\n"``.
    ``id`` is the last event id seen on the stream so far (it carries over between events, as
    in the spec), ``None`` if no ``id:`` field has been seen. ``retry`` is the ``retry:`` value
    set in this block, ``None`` if none was.
    """

    event: str
    data: str
    id: str | None
    retry: int | None


class SSEParser:
    """Incremental parser for a Server-Sent Events byte stream.

    Follows the WHATWG event-stream parsing rules, with one deliberate deviation: a block
    that set ``event:``, ``id:`` or ``retry:`` but has no ``data:`` line is dispatched
    (with ``data == ""``), where a browser would drop it. Dify's keep-alive is exactly
    ``event: ping\\n\\n``, and the gateway wants to see it to reset idle timers. A block
    holding only comments, unknown fields or nothing still dispatches nothing.

    At EOF an unterminated last line is processed, then an event without its closing
    blank line is discarded, as the spec says.
    """

    __slots__ = (
        "_closed",
        "_data",
        "_data_size",
        "_event",
        "_first_line",
        "_has_fields",
        "_last_id",
        "_max",
        "_partial",
        "_retry",
        "_skip_lf",
    )

    def __init__(self, *, max_event_bytes: int = 4 * 1024 * 1024) -> None:
        self._max = max_event_bytes
        self._partial = bytearray()
        self._skip_lf = False
        self._first_line = True
        self._closed = False
        # The event being built.
        self._data: list[bytes] = []
        self._data_size = 0
        self._event: bytes | None = None
        self._retry: int | None = None
        self._has_fields = False
        # Survives dispatch, as the spec's "last event ID buffer".
        self._last_id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Take the next bytes of the body; return the events they complete, in order."""
        if self._closed:
            raise SSEProtocolError("SSE parser fed after EOF or after an error")
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
                if not chunk:
                    return []

        lines = chunk.splitlines()
        last = chunk[-1]
        self._skip_lf = last == _CR
        tail = b"" if last in (_LF, _CR) else lines.pop()
        if lines and self._partial:
            # The chunk's first line (b"" if it opens with a terminator) ends the pending one.
            self._partial += lines[0]
            lines[0] = bytes(self._partial)
            self._partial.clear()

        events: list[SSEEvent] = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        if tail:
            self._partial += tail
            if len(self._partial) > self._max:
                self._fail("SSE line longer than max_event_bytes")
        return events

    def feed_eof(self) -> list[SSEEvent]:
        """Signal the end of the body and close the parser.

        An unterminated last line still counts as a line, but an event without its closing
        blank line is discarded, so this returns an empty list in practice.
        """
        if self._closed:
            raise SSEProtocolError("SSE parser fed after EOF or after an error")
        events: list[SSEEvent] = []
        if self._partial:
            line = bytes(self._partial)
            self._partial.clear()
            event = self._line(line)
            if event is not None:  # pragma: no cover - a non-empty line never dispatches
                events.append(event)
        self._closed = True
        self._reset_event()
        return events

    # -- internals ---------------------------------------------------------------------------

    def _fail(self, reason: str) -> NoReturn:
        self._closed = True
        raise SSEProtocolError(reason)

    def _reset_event(self) -> None:
        self._data = []
        self._data_size = 0
        self._event = None
        self._retry = None
        self._has_fields = False

    def _line(self, line: bytes) -> SSEEvent | None:
        if self._first_line:
            self._first_line = False
            if line.startswith(_BOM):
                line = line[3:]
        if len(line) > self._max:
            self._fail("SSE line longer than max_event_bytes")
        if not line:
            return self._dispatch()
        colon = line.find(b":")
        if colon == 0:
            return None  # comment
        if colon < 0:
            field, value = line, b""
        else:
            field = line[:colon]
            value = line[colon + 2 :] if line[colon + 1 : colon + 2] == b" " else line[colon + 1 :]

        if field == b"data":
            size = self._data_size + len(value) + (1 if self._data else 0)
            if size > self._max:
                self._fail("SSE event data longer than max_event_bytes")
            self._data.append(value)
            self._data_size = size
        elif field == b"event":
            self._event = value
            self._has_fields = True
        elif field == b"id":
            if b"\x00" not in value:
                self._last_id = value.decode("utf-8", "replace")
                self._has_fields = True
        elif (
            field == b"retry"
            and value.isdigit()
            and len(digits := value.lstrip(b"0")) <= _MAX_RETRY_DIGITS
        ):
            self._retry = int(digits or b"0")
            self._has_fields = True
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data and not self._has_fields:
            return None
        event = SSEEvent(
            event="" if self._event is None else self._event.decode("utf-8", "replace"),
            data=b"\n".join(self._data).decode("utf-8", "replace"),
            id=self._last_id,
            retry=self._retry,
        )
        self._reset_event()
        return event
