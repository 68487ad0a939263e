"""Per-request frame numbering (worker side) and in-order delivery (gateway side).

The worker stamps ``seq`` 1, 2, 3 … on a request's frames (``accepted`` is 1, stamped by the
gateway). Frames can reach a gateway twice (live and replayed from the frames stream on
``resume``) or, rarely, out of order (a redelivered job on another worker, a replay racing the
live path). :class:`Reorderer` turns whatever arrives into exactly-once, in-order output:
duplicates are dropped, early frames wait in a bounded buffer until the gap closes.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from shared.exceptions import InternalError

__all__ = ["Reorderer", "SeqCounter", "SequenceGap"]

T = TypeVar("T")


class SeqCounter:
    """Hands out the next ``seq`` of one request."""

    __slots__ = ("last",)

    def __init__(self, last: int = 0) -> None:
        self.last = last

    def next(self) -> int:
        self.last += 1
        return self.last


class SequenceGap(InternalError):
    """More frames waited behind a missing one than the window allows."""


class Reorderer(Generic[T]):
    """Releases items strictly by ``seq``, each exactly once."""

    __slots__ = ("_pending", "next_seq", "window")

    def __init__(self, next_seq: int = 1, *, window: int = 1024) -> None:
        self.next_seq = next_seq
        self.window = window
        self._pending: dict[int, T] = {}

    @property
    def delivered(self) -> int:
        """The highest seq released so far."""
        return self.next_seq - 1

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def push(self, seq: int, item: T) -> list[T]:
        """Offer one item; returns what can now be released, in order (often just ``[item]``)."""
        if seq == self.next_seq and not self._pending:
            self.next_seq += 1
            return [item]
        if seq < self.next_seq or seq in self._pending:
            return []
        self._pending[seq] = item
        if len(self._pending) > self.window:
            raise SequenceGap(
                f"seq {self.next_seq} missing with {len(self._pending)} later frames waiting"
            )
        out: list[T] = []
        while self.next_seq in self._pending:
            out.append(self._pending.pop(self.next_seq))
            self.next_seq += 1
        return out
