"""The asyncio task gauge both processes export (``tokenwire_<process>_asyncio_tasks``).

Why set, not a function read at scrape time: with ``--workers N`` / ``--processes N``
prometheus-client's multiprocess mode sums values the children wrote to files, and a gauge
function is only called in the process that answers the scrape. So each process sets its
count every second from its own event loop (and at scrape, in the process that answers). A
count that grows at constant load is a leak (bench/soak.py and tests/integration/test_soak.py
watch it); one that grows per connection is what issue 13 removed (test_fanin.py).
"""

from __future__ import annotations

import asyncio

from prometheus_client import Gauge

__all__ = ["count_tasks", "watch_tasks"]


def count_tasks(gauge: Gauge) -> None:
    """Set ``gauge`` to this event loop's live tasks (call it from the loop)."""
    gauge.set(len(asyncio.all_tasks()))


async def watch_tasks(gauge: Gauge, every_s: float = 1.0) -> None:
    """Keep ``gauge`` fresh until cancelled."""
    while True:
        count_tasks(gauge)
        await asyncio.sleep(every_s)
