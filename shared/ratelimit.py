"""Token buckets as pure functions: a rate, a state, a clock reading in; a decision out.

How this works: a bucket holds at most ``burst`` tokens and refills at ``per_second``; a
request takes one token or is refused with the time until one is back. The state is two
numbers (tokens, time of the reading), so the same function serves a bucket kept in memory
(per connection) and one kept in a NATS KV entry shared by every gateway (per user), where
the gateway reads the entry, calls :func:`take` and writes the new state back with a
compare-and-set. A missing state is a full bucket: a KV entry that expired had refilled.

A gateway that decided a chat from its own copy of the shared bucket writes the spend with
:func:`spend`, which may leave the bucket in debt (see ``gateway/limits.py``); :func:`take`
refuses while there is debt.

Nothing here reads a clock or does I/O; callers pass ``now`` (seconds, any monotone-enough
clock shared by the parties that update one state).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BucketState",
    "Decision",
    "Rate",
    "decode_state",
    "encode_state",
    "parse_rate",
    "rate_count",
    "spend",
    "take",
]

_UNITS: Final = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_RATE_RE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$")


def parse_rate(text: str) -> float:
    """Events per second of ``"20/min"``, ``"5/s"``, ``"100/hour"``, ``"3/10s"``.

    Raises ValueError for anything else (a setting that cannot be read must stop the start).
    """
    count, period = _split(text)
    return count / period


def rate_count(text: str) -> float:
    """The N of ``"N/unit"``: how many a user who writes the rate means to allow at once."""
    return _split(text)[0]


def _split(text: str) -> tuple[float, float]:
    """``(count, period in seconds)`` of a rate."""
    match = _RATE_RE.match(text.lower())
    unit = match.group(3) if match else ""
    if unit not in _UNITS and len(unit) > 3 and unit.endswith("s"):
        unit = unit[:-1]  # plurals: "mins", "hours"
    if match is None or unit not in _UNITS:
        raise ValueError(f"rate {text!r}: expected N/unit, e.g. 20/min, 5/s, 100/hour")
    count = float(match.group(1))
    period = float(match.group(2) or 1) * _UNITS[unit]
    if count <= 0 or period <= 0:
        raise ValueError(f"rate {text!r}: must be positive")
    return count, period


@dataclass(frozen=True, slots=True)
class Rate:
    """Refill speed (tokens per second) and capacity (the largest burst)."""

    per_second: float
    burst: float

    def __post_init__(self) -> None:
        if not (self.per_second > 0 and math.isfinite(self.per_second)):
            raise ValueError("per_second must be positive")
        if not (self.burst >= 1 and math.isfinite(self.burst)):
            raise ValueError("burst must be at least 1")

    @classmethod
    def parse(cls, text: str, burst: float) -> Rate:
        return cls(parse_rate(text), burst)

    @property
    def refill_s(self) -> float:
        """Seconds an empty bucket takes to fill: a state older than this is a full bucket."""
        return self.burst / self.per_second


@dataclass(frozen=True, slots=True)
class BucketState:
    tokens: float
    at: float


@dataclass(frozen=True, slots=True)
class Decision:
    """``allowed``; the state to keep (unchanged when refused); seconds until allowed."""

    allowed: bool
    state: BucketState
    retry_after_s: float


def take(rate: Rate, state: BucketState | None, now: float, cost: float = 1.0) -> Decision:
    """Take ``cost`` tokens from the bucket at time ``now``, if it holds them."""
    if state is None:
        tokens = rate.burst
    else:
        tokens, now = _refilled(rate, state, now)
    if tokens >= cost:
        return Decision(True, BucketState(tokens - cost, now), 0.0)
    # More than the bucket can ever hold never passes.
    wait = (cost - tokens) / rate.per_second if cost <= rate.burst else math.inf
    return Decision(False, BucketState(tokens, now), wait)


def spend(rate: Rate, state: BucketState | None, now: float, cost: float = 1.0) -> BucketState:
    """Spend ``cost`` tokens whatever the bucket holds: what a gateway that already let a chat
    through writes to the shared bucket. Below zero is debt that the refill pays off first
    (at most one burst of it is kept), so over time the rate holds exactly."""
    tokens, now = (rate.burst, now) if state is None else _refilled(rate, state, now)
    return BucketState(max(tokens - cost, -rate.burst), now)


def _refilled(rate: Rate, state: BucketState, now: float) -> tuple[float, float]:
    """The tokens in ``state``'s bucket at ``now`` (debt counts), and the reading's time."""
    # A clock that went backwards (another gateway's) refills nothing, takes nothing.
    elapsed = max(0.0, now - state.at)
    tokens = min(rate.burst, max(-rate.burst, state.tokens) + elapsed * rate.per_second)
    return tokens, max(now, state.at)


def encode_state(state: BucketState) -> bytes:
    return f"{state.tokens:.6f} {state.at:.6f}".encode()


def decode_state(data: bytes) -> BucketState | None:
    """The state in a KV entry, or None (a full bucket) for anything unreadable."""
    try:
        tokens, at = data.decode().split()
        state = BucketState(float(tokens), float(at))
    except (ValueError, UnicodeDecodeError):
        return None
    if not (math.isfinite(state.tokens) and math.isfinite(state.at)):
        return None
    return state
