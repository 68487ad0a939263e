"""What the gateway's and the worker's metrics share: bounded label values and bucket ladders.

``gateway/metrics.py`` and ``worker/metrics.py`` each declare their own families; the rules they
have in common live here once. A label never holds a user id, a request id, a key or any other
unbounded value: :func:`bounded` turns a value outside its known set into ``"other"``, and the
known sets of frame types and error codes come from the protocol's own catalogues, so a new
frame type or code is a label value as soon as it exists. No I/O, no prometheus_client.
"""

from __future__ import annotations

from typing import Final, get_args

from shared.exceptions import ErrorCode
from shared.frames import ServerFrame

__all__ = ["ERROR_CODES", "LATENCY_BUCKETS", "OTHER", "SERVER_FRAME_TYPES", "bounded"]

#: The label value of anything outside a known set.
OTHER: Final = "other"

#: Seconds; a first byte or first token: from 10 ms (a warm, local Dify) to a minute.
LATENCY_BUCKETS: Final = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    30.0,
    60.0,
)

#: Every server frame type of the protocol (``type`` of each frame class).
SERVER_FRAME_TYPES: Final = frozenset(
    cls.__dataclass_fields__["type"].default for cls in get_args(ServerFrame)
)
#: Every protocol error code.
ERROR_CODES: Final = frozenset(code.value for code in ErrorCode)


def bounded(value: str, allowed: frozenset[str]) -> str:
    """``value`` if it is one of ``allowed``, else ``"other"``."""
    return value if value in allowed else OTHER
