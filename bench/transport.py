"""httpx's default transport against httpx-aiohttp's, on the worker's own streaming path.

    .venv/bin/python -m bench.transport [--streams 50] [--tokens 400] [--rounds 3]

Starts the Dify simulator (unpaced answers), then in this one process streams ``--streams``
answers at once through :class:`worker.dify.DifyClient` (the worker's pooled client, its
SSE parser and its error mapping), once per transport and round, alternating, and reports
Dify events per second, this process's CPU µs per event (the lowest round) and the time from
sending a request to its first parsed event (p50 of 20 paced answers, first token after
20 ms: that includes the simulator's 20 ms). Only the transport differs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.system import SimSpec, System
from shared.settings import Settings
from worker.dify import DifyClient


def _transports() -> dict[str, Any]:
    made: dict[str, Any] = {"httpx default (httpcore)": lambda: None}
    try:
        from httpx_aiohttp import AiohttpTransport
    except ImportError:  # pragma: no cover - the bench extra installs it
        return made
    made["httpx-aiohttp"] = AiohttpTransport
    return made


async def _stream_once(client: DifyClient, n: int, inputs: dict[str, Any] | None = None) -> int:
    body = {"query": f"bench {n}", "user": f"u{n}", "inputs": inputs or {},
            "response_mode": "streaming"}  # fmt: skip
    events = 0
    async with client.stream_chat(body, trace_id=f"t{n}") as reads:
        async for batch in reads:
            events += len(batch)
    return events


async def _first_event_ms(client: DifyClient, n: int) -> float:
    """One paced answer (first token after 20 ms): request sent → first event parsed."""
    body = {"query": f"ttft {n}", "user": f"u{n}", "response_mode": "streaming",
            "inputs": {"tw_sim": {"delay_ms": 20, "tokens": 3}}}  # fmt: skip
    sent = time.perf_counter()
    first = 0.0
    async with client.stream_chat(body, trace_id=f"f{n}") as reads:
        async for _ in reads:
            first = first or time.perf_counter()
    return (first - sent) * 1000


async def _measure(url: str, make: Any, streams: int, rounds_each: int) -> dict[str, float]:
    settings = Settings(dify_api_url=url, dify_api_key="app-bench", worker_concurrency=streams)
    transport = make()
    client = DifyClient(settings, transport=transport)
    try:
        await asyncio.gather(*(_stream_once(client, i) for i in range(streams)))  # warm up
        gc.collect()
        cpu0, t0 = time.process_time(), time.perf_counter()
        counts = []
        for r in range(rounds_each):
            counts += await asyncio.gather(
                *(_stream_once(client, r * streams + i) for i in range(streams))
            )
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        firsts = sorted([await _first_event_ms(client, i) for i in range(20)])
    finally:
        await client.aclose()
    events = sum(counts)
    return {
        "first_event_p50_ms": firsts[len(firsts) // 2],
        "events": events,
        "events_per_s": events / wall,
        "cpu_us_per_event": cpu * 1e6 / events,
        "wall_s": wall,
    }


def run(streams: int, tokens: int, rounds: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="tokenwire-transport-"))
    system = System(workdir)
    results: dict[str, list[dict[str, float]]] = {}
    try:
        system.start_simulator(SimSpec(token_delay_ms=0, tokens=tokens))
        for _ in range(rounds):
            for name, make in _transports().items():
                one = asyncio.run(_measure(system.sim_url, make, streams, 2))
                results.setdefault(name, []).append(one)
    finally:
        system.close()
    return {"streams": streams, "tokens": tokens, "rounds": rounds, "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    out = run(args.streams, args.tokens, args.rounds)
    print(f"{args.streams} streams x {args.tokens} events, unpaced; best of {args.rounds}")
    print(f"{'transport':<26} {'events/s':>9} {'CPU µs/event':>13} {'1st event ms':>12}  (rounds)")
    for name, runs in out["results"].items():
        best = max(runs, key=lambda r: r["events_per_s"])
        cpu = min(r["cpu_us_per_event"] for r in runs)
        first = min(r["first_event_p50_ms"] for r in runs)
        each = " / ".join(f"{r['events_per_s']:,.0f} {r['cpu_us_per_event']:.1f}µs" for r in runs)
        print(f"{name:<26} {best['events_per_s']:>9,.0f} {cpu:>13.1f} {first:>12.2f}  ({each})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
