"""What nats-server pays for replay consumers on one frame stream (issue 17's storm).

    .venv/bin/python -m bench.replay_cost [--requests 1000] [--history 120] [--live-s 15]
                                          [--json F]

Why: in the reconnect storm (``bench.storm``) nats-server, not the gateways, took the CPU:
243 CPU-s with one frame partition, 15 with four. Every resumed request reads its frames
through its own ordered consumer on its partition's stream (``GatewayBus.replay``), so this
measures that alone, without gateways: one nats-server, the frame store's own ``TW_FRAMES``
(``shared/topology.py``), ``--requests`` subjects ``tw.frames.0.<gateway>.<conn>.<key>`` with
``--history`` frames each, interleaved as concurrent answers are.

1. **Replay**: one ordered consumer per request from its first frame (``DeliverPolicy.ALL``),
   all at once, until each has its ``--history`` frames: wall time and nats-server CPU.
2. **Live**: every request keeps publishing 4 frames/s for ``--live-s`` while the consumers
   sit at the stream's tail: nats-server's share of a core, against no consumers at all.

Each with the filter the gateway uses (``tw.frames.<p>.*.*.<key>``, any connection) and with
the request's literal subject, to show what the wildcard costs on top. Reported per run; the
numbers are in docs/benchmarks.md ("Reconnect storm and soak").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from nats.js.api import DeliverPolicy

from bench.frame_store import frame_stream_config
from bench.stats import cpu_seconds
from shared.natsedge import ensure_stream
from shared.subjects import FRAMES_STREAM, request_frames, request_frames_any_connection
from tokenwire.natsserver import NatsServer

__all__ = ["main"]

#: A single-token frame's size on the wire (the frame store's benchmark: ~120 bytes).
FRAME = b'{"type":"delta","id":"r","seq":7,"text":"token"}' + b" " * 70
LIVE_RATE = 4  # frames/s per request: the storm's 250 ms pace


async def _run(filter_kind: str, requests: int, history: int, live_s: float) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="tokenwire-replay-cost-"))
    server = NatsServer(workdir / "nats")
    server.start()
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, frame_stream_config(1))  # the product's own TW_FRAMES
        keys = [f"{i:032x}" for i in range(requests)]
        subjects = [
            request_frames(f"gw{i % 3}", f"c{i}", k, partitions=1) for i, k in enumerate(keys)
        ]
        for _ in range(history):
            await asyncio.gather(*(js.publish(s, FRAME) for s in subjects))
        assert server.pid is not None
        pid = server.pid
        row: dict[str, Any] = {"filter": filter_kind, "requests": requests, "history": history}
        if filter_kind != "none":
            received = [0]
            caught_up = asyncio.Event()

            async def on_frame(msg: Any) -> None:
                received[0] += 1
                if received[0] == requests * history:
                    caught_up.set()

            def filter_of(i: int) -> str:
                if filter_kind == "literal":
                    return subjects[i]
                return request_frames_any_connection(keys[i], partitions=1)

            cpu, started = cpu_seconds(pid), time.monotonic()
            await asyncio.gather(
                *(
                    js.subscribe(
                        filter_of(i),
                        stream=FRAMES_STREAM,
                        cb=on_frame,
                        ordered_consumer=True,
                        deliver_policy=DeliverPolicy.ALL,
                    )
                    for i in range(requests)
                )
            )
            await asyncio.wait_for(caught_up.wait(), 600)
            row["replay_s"] = round(time.monotonic() - started, 2)
            row["replay_nats_cpu_s"] = round(cpu_seconds(pid) - cpu, 2)
            await asyncio.sleep(1)
        cpu, started, sent = cpu_seconds(pid), time.monotonic(), 0
        while time.monotonic() - started < live_s:
            tick = time.monotonic()
            await asyncio.gather(*(js.publish(s, FRAME) for s in subjects))
            sent += requests
            await asyncio.sleep(max(0.0, 1 / LIVE_RATE - (time.monotonic() - tick)))
        elapsed = time.monotonic() - started
        row["live_frames_per_s"] = round(sent / elapsed)
        row["live_nats_core_pct"] = round(100 * (cpu_seconds(pid) - cpu) / elapsed)
        return row
    finally:
        await nc.close()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.replay_cost", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--history", type=int, default=120, help="frames kept per request")
    parser.add_argument("--live-s", type=float, default=15.0)
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args(argv)
    rows = [
        asyncio.run(_run(kind, args.requests, args.history, args.live_s))
        for kind in ("none", "literal", "any connection")
    ]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
