"""Where a gateway's memory per idle connection goes: a ``tracemalloc`` census.

    .venv/bin/python -m bench.memory_census [--connections 2000] [--key filename] [--rss-only]
        [-- ARGS]

Starts NATS, the simulator and one gateway through :mod:`bench.gateway_variant` with
``--trace-memory`` (plus ``ARGS``, e.g. ``--no-deflate``), snapshots its allocations, opens
the idle connections, snapshots again and prints the largest differences (``--key``:
``filename``, ``lineno`` or ``traceback``) with the RSS per connection. tracemalloc itself
adds memory, so the RSS here is above section 3's; the shares are what matter.
``--rss-only`` skips tracemalloc (which also makes the gateway start minutes slower on a
busy machine) and prints the RSS per idle connection alone, comparable across versions.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import httpx

from bench.loadgen import LoadSpec, raise_nofile, run_load
from bench.system import SimSpec, System, rss_kib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--key", default="filename", choices=["filename", "lineno", "traceback"])
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--rss-only", action="store_true", help="no tracemalloc: RSS alone")
    parser.add_argument("gateway_args", nargs="*", help="more bench.gateway_variant args")
    args = parser.parse_args()
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="tokenwire-census-"))
    system = System(workdir)
    try:
        system.start_nats()
        system.start_simulator(SimSpec(token_delay_ms=20, tokens=20))
        trace = [] if args.rss_only else ["--trace-memory"]
        gateway = system.start_gateway(*trace, *args.gateway_args)
        base = f"http://127.0.0.1:{gateway.port}/_bench/memory"
        if not args.rss_only:
            httpx.get(f"{base}?snap=a", timeout=60)
        before = rss_kib(gateway.pid)

        def census(opened: int) -> None:
            per_conn = (rss_kib(gateway.pid) - before) / max(opened, 1)
            how = "without" if args.rss_only else "with"
            print(f"{opened} idle connections, {per_conn:.1f} KiB RSS each ({how} tracemalloc)")
            if args.rss_only:
                return
            query = f"?snap=b&key={args.key}&top={args.top}"
            print(httpx.get(base + query, timeout=120).text)

        spec = LoadSpec(
            kind="idle",
            urls=[f"ws://127.0.0.1:{gateway.port}/v1/ws"],
            connections=args.connections,
            processes=2,
            label=f"census ×{args.connections}",
        )
        run_load(spec, while_idle=census)
    finally:
        system.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
