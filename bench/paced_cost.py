"""What one token costs each process at a chat's real pace (30 tokens/s), for sizing.

    .venv/bin/python -m bench.paced_cost [--connections 50,100] [--rounds 3] [--json PATH]

docs/benchmarks.md's CPU per token comes from unpaced answers, where coalescing puts ~100
tokens in a frame. At 30 tokens/s a token finds its request quiet for 33 ms, longer than
``TOKENWIRE_COALESCE_MS`` (16), so every token is its own frame: this measures that case. It
starts NATS, the simulator (a token every 33.3 ms, 60-token answers), one gateway and one
worker as shipped, runs each ``--connections`` level (answers back to back, staggered over one
answer; :meth:`bench.scenarios.Recorder._paced`) and prints CPU µs per delivered token and per
frame of the gateway, the worker and nats-server, with the machine's load beside them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.loadgen import raise_nofile
from bench.scenarios import Plan, Recorder
from bench.stats import ForeignLoad
from bench.system import SimSpec, System

__all__ = ["main", "run"]

PACE = SimSpec(token_delay_ms=1000 / 30, tokens=60)
_PROCESSES = ("gateway", "worker", "nats-server")


def run(levels: list[int], rounds: int) -> dict[str, Any]:
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="tokenwire-paced-cost-"))
    system = System(workdir)
    console = Console(stderr=True)
    rec = Recorder(system, Plan.full(), workdir, console=console)
    rows: list[dict[str, Any]] = []
    try:
        system.start_nats()
        system.start_simulator(PACE)
        system.start_worker()
        system.start_gateway()
        rec.warmup("tokenwire", PACE)
        for connections in levels:
            foreign = ForeignLoad()
            row = rec._paced(  # the same load as the benchmark's own section 7
                "tokenwire", PACE, connections, rounds, stagger=True, label="30 tokens/s"
            )
            row["connections"] = connections
            row["foreign_cpu_pct"] = foreign.pct()
            frames_per_token = row["frames_per_token"]
            row["cpu_us_per_frame"] = {
                name: us / frames_per_token for name, us in row["cpu_us_per_token"].items()
            }
            rows.append(row)
    finally:
        system.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"sim": {"token_delay_ms": PACE.token_delay_ms, "tokens": PACE.tokens}, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.paced_cost", description=__doc__)
    parser.add_argument("--connections", default="50,100", help="comma-separated levels")
    parser.add_argument("--rounds", type=int, default=3, help="answers per connection")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    out = run([int(n) for n in args.connections.split(",")], args.rounds)
    print("| connections | tokens/s | frames per token | complete | "
          + " | ".join(f"{p} µs/token" for p in _PROCESSES)
          + " | total µs/token | gap p99 ms | others' CPU % |")  # fmt: skip
    print("|---" * (len(_PROCESSES) + 7) + "|")
    for row in out["rows"]:
        per = row["cpu_us_per_token"]
        cells = [f"{per.get(p, float('nan')):.1f}" for p in _PROCESSES]
        total = sum(per.get(p, 0.0) for p in _PROCESSES)
        print(
            f"| {row['connections']} | {row['tokens_per_s']:,.0f} | {row['frames_per_token']:.2f} "
            f"| {row['complete']}/{row['streams']} | " + " | ".join(cells)
            + f" | {total:.1f} | {row['gaps']['p99']:.1f} | {row['foreign_cpu_pct']:.0f} |"
        )  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, allow_nan=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
