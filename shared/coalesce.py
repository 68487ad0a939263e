"""When a request's frames leave the worker: adaptive coalescing of ``delta`` text. No I/O.

How this works. The worker maps Dify's events to frames (``shared/mapping.py``) and hands
every frame of one delivery, in order, to one :class:`Coalescer`, together with the time
(``now``, any monotonic clock in seconds). The coalescer answers with the frames to publish
now, and :attr:`Coalescer.deadline` tells the shell when to come back (:meth:`Coalescer.due`)
if text is waiting. The rule:

* **The first ``delta`` goes out at once**, and so does any ``delta`` that finds the request
  quiet for ``interval_s`` or more: under light load (a token every 40 ms) nothing changes.
* Otherwise its text **waits**, and text that arrives while it waits is appended to it; the
  waiting ``delta`` goes out at the deadline (``interval_s`` after the previous ``delta`` left),
  or at once when it holds ``max_chars``. A request thus sends at most one ``delta`` per
  ``interval_s`` (16 ms, one display refresh: a reader sees nothing slower).
* **Everything of one** :meth:`Coalescer.feed` **call** (the events parsed from one read of
  Dify's stream) goes out as one ``delta``.
* **Only consecutive ``delta``\\ s merge.** Any other frame (``start``, ``replace``, ``event``,
  ``end``, ``error``, ``reset``, ``queued``) first flushes the text waiting before it, then goes
  out itself, at once: order is kept, and an ending is never held back.
* **``seq`` is stamped on the way out**: the coalescer numbers the frames it releases from the
  request's last kept ``seq`` on, so a merged run takes one number and ``seq`` stays gapless
  (the numbers the mapper gave are drafts). What was released is all a client, the frames
  stream and a later delivery ever see, so ``resume`` and recovery need no special case.

``interval_s = 0`` turns coalescing off: every frame leaves as it came (one per token).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Final

from shared.frames import Delta, ServerFrame
from shared.sequencing import SeqCounter

__all__ = ["DEFAULT_INTERVAL_S", "DEFAULT_MAX_CHARS", "Coalescer"]

#: One display refresh at 60 Hz.
DEFAULT_INTERVAL_S: Final = 0.016
#: Waiting text goes out once it is this long (characters; a frame stays a few KiB).
DEFAULT_MAX_CHARS: Final = 4096
# A timer may fire a little before its deadline (the loop's clock resolution).
_EARLY_S: Final = 1e-6


class Coalescer:
    """Decides when one request's frames leave, and stamps their ``seq``."""

    __slots__ = ("_held", "_held_chars", "_last_delta_at", "interval_s", "max_chars", "seq")

    def __init__(
        self,
        last_seq: int,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> None:
        #: The seq of the last frame released (the request's last kept seq at the start).
        self.seq = SeqCounter(last_seq)
        self.interval_s = interval_s
        self.max_chars = max_chars
        self._held: list[Delta] = []
        self._held_chars = 0
        self._last_delta_at: float | None = None

    # --- what the shell asks ---------------------------------------------------------------

    @property
    def waiting(self) -> bool:
        """Whether text waits for the deadline."""
        return bool(self._held)

    @property
    def deadline(self) -> float | None:
        """When the waiting text is due (call :meth:`due` then); None if nothing waits."""
        if not self._held or self._last_delta_at is None:
            return None
        return self._last_delta_at + self.interval_s

    # --- input -----------------------------------------------------------------------------

    def feed(self, frames: Iterable[ServerFrame], now: float) -> list[ServerFrame]:
        """Take the frames mapped from one read of Dify's stream; return those to send now."""
        out: list[ServerFrame] = []
        if self.interval_s <= 0:
            for frame in frames:
                out.append(self._stamp(frame))
            return out
        for frame in frames:
            if isinstance(frame, Delta):
                if self._held and self._held_chars + len(frame.text) > self.max_chars:
                    self._release(out, now)
                self._held.append(frame)
                self._held_chars += len(frame.text)
            else:
                if self._held:
                    self._release(out, now)
                out.append(self._stamp(frame))
        if self._held and (self._quiet(now) or self._held_chars >= self.max_chars):
            self._release(out, now)
        return out

    def due(self, now: float) -> list[ServerFrame]:
        """The shell's timer fired: the waiting text, if its deadline has come."""
        deadline = self.deadline
        if deadline is None or now + _EARLY_S < deadline:
            return []
        out: list[ServerFrame] = []
        self._release(out, now)
        return out

    def flush(self, now: float) -> list[ServerFrame]:
        """Everything waiting, now (the delivery is about to make sure its frames were kept)."""
        out: list[ServerFrame] = []
        if self._held:
            self._release(out, now)
        return out

    # --- helpers ---------------------------------------------------------------------------

    def _quiet(self, now: float) -> bool:
        last = self._last_delta_at
        return last is None or now - last >= self.interval_s

    def _release(self, out: list[ServerFrame], now: float) -> None:
        held = self._held
        first = held[0]
        if len(held) == 1:
            out.append(self._stamp(first))
        else:
            text = "".join(d.text for d in held)
            out.append(Delta(id=first.id, seq=self.seq.next(), text=text))
        self._held = []
        self._held_chars = 0
        self._last_delta_at = now

    def _stamp(self, frame: ServerFrame) -> ServerFrame:
        seq = self.seq.next()
        if getattr(frame, "seq", seq) == seq:
            return frame
        return dataclasses.replace(frame, seq=seq)  # type: ignore[arg-type]
