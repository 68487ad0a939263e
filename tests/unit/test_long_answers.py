"""Issue 17: a 100,000-token answer costs the same per token as a 100-token one.

Two places grew an answer by re-copying it on every token: the simulator's stored message
(and its script walked by popping a list's head), and the Python client's folded ``text``.
Not a timing budget (those belong to bench/, see docs/benchmarks.md "long answers"): CPU time
must grow like the input. Eight times the tokens may cost at most ~3x eight times the time;
the quadratic versions cost eighty to a hundred times. CPU time of this process, best of two,
so other processes on a busy machine barely move it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson

from tokenwire.client import ChatStream, Connection
from tokenwire.simulator import SimConfig, SimControls, expected_answer
from tokenwire.simulator.apps import AppSpec
from tokenwire.simulator.engine import Engine, SendPayload
from tokenwire.simulator.responses import Signal
from tokenwire.simulator.state import Generation, Store

SMALL = 10_000
LARGE = 80_000


def _cpu_s(work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(2):
        start = time.process_time()
        work()
        best = min(best, time.process_time() - start)
    return max(best, 1e-4)


# -- the simulator ----------------------------------------------------------------------------


def _start(engine: Engine, query: str, tokens: int) -> Generation:
    payload = SendPayload(
        query=query, inputs={}, user="u", streaming=True, conversation_id=None, files=[]
    )
    controls = SimControls(tokens=tokens, delay_ms=0)
    return engine.start(AppSpec(), "chat", payload, controls)


async def _generate(tokens: int) -> str:
    engine = Engine(Store(SimConfig()))
    query = f"long answer {tokens}"
    generation = _start(engine, query, tokens)
    frames = 0
    while await generation.queue.get() is not Signal.END:
        frames += 1
    assert frames == tokens + 1  # every delta, then message_end
    assert generation.message is not None
    assert generation.message.answer == expected_answer(query, tokens)
    return generation.message.answer


def test_an_unpaced_simulated_answer_costs_the_same_per_token() -> None:
    small = _cpu_s(lambda: asyncio.run(_generate(SMALL)))
    large = _cpu_s(lambda: asyncio.run(_generate(LARGE)))
    assert large / small < 24, (small, large)


async def test_an_unpaced_simulated_answer_streams_before_it_is_generated() -> None:
    # A 100,000-token answer at delay 0 used to reach the client only once all of it was
    # generated: the response's first frame now leaves while the generation goes on.
    engine = Engine(Store(SimConfig()))
    generation = _start(engine, "streams early", 20_000)
    first = await generation.queue.get()
    assert isinstance(first, bytes) and b'"event":"message"' in first
    assert generation.task is not None and not generation.task.done()
    await generation.task


# -- the Python client ------------------------------------------------------------------------


def _fold(count: int) -> None:
    conn = Connection("ws://127.0.0.1:9/v1/ws")
    stream = ChatStream(connection=conn, id="r", query="q")
    conn.requests[stream.id] = stream
    for seq in range(2, count + 2):
        conn._handle(orjson.dumps({"type": "delta", "id": "r", "seq": seq, "text": " token"}))
    assert len(stream.text) == 6 * count


def test_folding_many_deltas_costs_the_same_per_delta() -> None:
    small = _cpu_s(lambda: _fold(SMALL))
    large = _cpu_s(lambda: _fold(LARGE))
    assert large / small < 24, (small, large)


def test_text_reads_between_deltas_and_after_replace_and_reset() -> None:
    conn = Connection("ws://127.0.0.1:9/v1/ws")
    stream = ChatStream(connection=conn, id="r", query="q")
    conn.requests[stream.id] = stream
    frames = [
        {"type": "delta", "seq": 2, "text": "Hel"},
        {"type": "delta", "seq": 3, "text": "lo"},
        {"type": "replace", "seq": 4, "text": "Bye"},
        {"type": "delta", "seq": 5, "text": "!"},
    ]
    seen = []
    for frame in frames:
        conn._handle(orjson.dumps({**frame, "id": "r"}))
        seen.append(stream.text)
    assert seen == ["Hel", "Hello", "Bye", "Bye!"]
    conn._handle(orjson.dumps({"type": "reset", "id": "r", "seq": 6, "reason": "retry"}))
    assert stream.text == ""
