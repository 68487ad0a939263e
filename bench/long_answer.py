"""Long answers (issue 17): time per token from 100 to 100,000 tokens, end to end.

One answer at a time through the running system (simulator → worker → NATS → gateway → the
Python client, ``tokenwire.client``), unpaced (``tw_sim.delay_ms`` 0: the simulator sends as
fast as it generates), so every microsecond per token is tokenwire's and the simulator's own
work. Per size: the wall time from ``chat`` to ``end``, the time to the first ``delta``, and
the CPU each server process spent (from ``/proc/<pid>/stat``), each divided by the tokens.
A flat column is the point: an answer that re-copies itself per token shows up here as a
time per token that grows tenfold with the size (the simulator's stored answer and the
client's folded text did, before issue 17's fix).

Run by ``python -m bench.run`` (section "long answers"), or alone against a fresh system::

    .venv/bin/python -m bench.long_answer [--sizes 100,1000,10000,100000]
    .venv/bin/python -m bench.long_answer --into docs/bench/results.json  # then --render
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.system import SimSpec, System
from tokenwire.client import Connection
from tokenwire.simulator import expected_final_answer

__all__ = ["FULL_SIZES", "QUICK_SIZES", "measure", "rounds_for"]

FULL_SIZES = [100, 1_000, 10_000, 100_000]
QUICK_SIZES = [100, 5_000]
# Short answers are noisy (one scheduling hiccup is a large share, and CPU is counted in
# 10 ms ticks): more rounds for them, about the same number of tokens per size otherwise.
_TOKENS_PER_SIZE = 100_000
_MAX_ROUNDS = 20


def rounds_for(tokens: int, budget: int = _TOKENS_PER_SIZE) -> int:
    """How many answers of ``tokens`` to time (the median is reported), about ``budget``
    tokens in all."""
    return max(1, min(_MAX_ROUNDS, budget // tokens))


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _one(url: str, tokens: int, name: str) -> dict[str, Any]:
    controls = {"tokens": tokens, "delay_ms": 0}
    query = f"long answer {name}"
    async with Connection(url, user=f"long-{name}") as conn:
        started, cpu0 = time.monotonic(), time.process_time()
        stream = await conn.chat(query, inputs={"tw_sim": controls})
        first: float | None = None
        async for frame in stream:
            if first is None and frame.type == "delta":
                first = time.monotonic() - started
        wall, cpu = time.monotonic() - started, time.process_time() - cpu0
        ok = stream.status.value == "done" and stream.text == expected_final_answer(query, controls)
        return {
            "wall_s": wall,
            "first_s": first,
            "frames": len(stream.frames),
            "ok": ok,
            "client_cpu_s": cpu,
        }


def measure(
    system: System, sizes: list[int], console: Console, *, budget: int = _TOKENS_PER_SIZE
) -> dict[str, Any]:
    """Time one unpaced answer of each size (several for short ones, ``budget`` tokens per
    size at most) through ``system``'s first gateway; the simulator must be running (its
    defaults do not matter)."""
    assert system.gateways and system.workers and system.sim is not None
    url = f"ws://127.0.0.1:{system.gateways[0].port}/v1/ws"
    assert system.nats is not None and system.nats.pid is not None
    pids = {
        "nats": system.nats.pid,
        "simulator": system.sim.pid,
        "worker": system.workers[0].pid,
        "gateway": system.gateways[0].pid,
    }
    asyncio.run(_one(url, 100, "warm-up"))
    rows = []
    for tokens in sizes:
        samples = []
        for n in range(rounds_for(tokens, budget)):
            before = {name: _cpu_s(pid) for name, pid in pids.items()}
            sample = asyncio.run(_one(url, tokens, f"{tokens}-{n}"))
            sample["cpu_s"] = {name: _cpu_s(pid) - before[name] for name, pid in pids.items()}
            samples.append(sample)
        mid = sorted(samples, key=lambda s: s["wall_s"])[len(samples) // 2]
        row = {
            "tokens": tokens,
            "rounds": len(samples),
            "ok": all(s["ok"] for s in samples),
            "frames": mid["frames"],
            "wall_s": mid["wall_s"],
            "first_s": mid["first_s"],
            "us_per_token": 1e6 * statistics.median(s["wall_s"] for s in samples) / tokens,
            # Summed over the rounds: a 100-token answer costs less than one CPU tick.
            "cpu_us_per_token": {
                name: 1e6 * sum(s["cpu_s"][name] for s in samples) / (tokens * len(samples))
                for name in pids
            }
            | {"client": 1e6 * sum(s["client_cpu_s"] for s in samples) / (tokens * len(samples))},
        }
        rows.append(row)
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in row["cpu_us_per_token"].items())
        console.print(
            f"{tokens:>7} tokens: {row['us_per_token']:.0f} µs/token end to end "
            f"(first delta {row['first_s'] or 0:.3f} s, {row['frames']} frames; "
            f"CPU µs/token {cpu}){'' if row['ok'] else '  WRONG ANSWER'}"
        )
    return {"sizes": sizes, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.long_answer", description=__doc__)
    parser.add_argument("--sizes", default=",".join(map(str, FULL_SIZES)))
    parser.add_argument(
        "--into",
        type=Path,
        metavar="RESULTS_JSON",
        help="also store the rows as the 'long answers' section of a bench.run results.json "
        "(then re-render it with python -m bench.run --render)",
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="tokenwire-long-"))
    system = System(workdir)
    try:
        system.start_nats()
        system.start_simulator(SimSpec(token_delay_ms=0, tokens=100))
        system.start_worker()
        system.start_gateway()
        result = measure(system, sizes, console)
        result["measured"] = {
            "by": "python -m bench.long_answer",
            "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
    except BaseException:
        console.print(system.logs())
        raise
    finally:
        system.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.into is not None:
        results = json.loads(args.into.read_text())
        results["long_answers"] = result
        args.into.write_text(json.dumps(results, indent=1, default=str, allow_nan=True))
        console.print(f"wrote the long answers into {args.into}")
    return 0 if all(r["ok"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
