"""Per-request frame numbering (worker side), in-order delivery (gateway side), and the
generation rule that fences a stale worker out (every reader).

The worker stamps ``seq`` 1, 2, 3 … on a request's frames (``accepted`` is 1, stamped by the
gateway). Frames can reach a gateway twice (live and replayed from the frames stream on
``resume``) or, rarely, out of order (a redelivered job on another worker, a replay racing the
live path). :class:`Reorderer` turns whatever arrives into exactly-once, in-order output:
duplicates are dropped, early frames wait in a bounded buffer until the gap closes.

**Generations.** A job may be delivered again while its earlier delivery still lives (a worker
frozen or cut off from NATS past the ack wait). Each delivery after the first takes the lease
with a higher *generation* (``gen``, the lease's KV revision: monotonic, never reused) and
stamps it on every frame it publishes; the first delivery's frames carry none (gen 0). Before
anything else a later delivery stores a ``fence`` frame (``gen``, ``after``: the last seq of the
answer it continues), published with ``Nats-Expected-Last-Subject-Sequence`` = the stream
sequence of the last kept frame it read, so in the frames stream's order the fence comes right
after the frames it continued from (it reads again and retries until that holds). The rule,
applied by :class:`Generations` to a request's frames **in stream order**, the one order every
reader shares (the gateway's live path is the stream's republish, a ``resume`` an ordered
consumer, a new delivery a read of the stream)::

    accepted (seq 1, stamped by the gateway) ─► always counts
    fence with gen > current  ─► current := gen; frames held with seq > after are discarded
    fence with gen <= current ─► ignored (a superseded delivery's)
    frame with gen == current ─► counts
    frame with gen <  current ─► stale: dropped (a fenced delivery's late frames)
    frame with gen >  current ─► early: its fence was not seen, the reader missed part of the
                                 stream (it reads the request back from the stream)

A delivery continues after the last seq a reader could have *released*: the contiguous run of
frames before its fence (:meth:`Reorderer.discard_above` drops the rest), so no client sees a
seq twice and every reader ends with the same frames.
"""

from __future__ import annotations

from enum import Enum
from typing import Generic, TypeVar

from shared.exceptions import InternalError

__all__ = ["Generations", "Reorderer", "SeqCounter", "SequenceGap", "Verdict"]

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

    def discard_above(self, seq: int) -> int:
        """Forget waiting items past ``seq`` (a fence's ``after``); how many were dropped."""
        late = [s for s in self._pending if s > seq]
        for s in late:
            del self._pending[s]
        return len(late)


class Verdict(Enum):
    COUNTS = "counts"  # part of the answer: on to the reorderer
    FENCE = "fence"  # a newer generation begins: discard held frames past its ``after``
    STALE = "stale"  # an older (fenced) generation's frame, or a superseded fence: drop
    EARLY = "early"  # a newer generation's frame before its fence: the reader missed some


class Generations:
    """The generation rule (module docstring) for one request, fed in stream order."""

    __slots__ = ("after", "gen")

    def __init__(self) -> None:
        self.gen = 0
        #: The current generation's fence ``after`` (0 for the first delivery).
        self.after = 0

    def offer(self, kind: str, gen: int, seq: int) -> Verdict:
        """Judge one frame (a ``fence``'s ``seq`` is its ``after``)."""
        if kind == "fence":
            if gen <= self.gen:
                return Verdict.STALE
            self.gen, self.after = gen, seq
            return Verdict.FENCE
        if kind == "accepted" or gen == self.gen:
            return Verdict.COUNTS
        return Verdict.STALE if gen < self.gen else Verdict.EARLY
