"""The reconnect storm (issue 17): N streaming clients on one gateway, that gateway SIGKILLed.

    .venv/bin/python -m bench.storm [--clients 1000] [--tokens 120] [--delay-ms 250] [--no-kill]
                                    [--json F]

How this works: three gateways; the victim takes every client first (its admission caps
lifted), the two survivors keep tokenwire's admission control at ``--max-handshakes`` and
``--max-resumes``. Every client (the real Python client, ``tokenwire.client.Connection``,
with the three URLs) asks one long, paced answer; once every client holds part of its answer
the victim is SIGKILLed. Every client then reconnects with jittered backoff, meets the
survivors' ``too_busy`` refusals (1013 at the handshake, an id-only ``error`` for a resume),
waits out their hints with jitter, and resumes. Reported: the time from the kill until 50 %,
99 % and 100 % of the answers were complete, the refusals each side saw, and every answer
checked against the simulator's exact text with each ``seq`` exactly once, and the CPU
seconds each process spent from the kill to the last answer. ``--no-kill`` is the control:
the same load with the first gateway left alive, so what the storm itself costs shows.

:func:`run_storm` is the client side, shared with ``tests/integration/test_storm.py`` (the
same scenario with fewer clients).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from tokenwire.client import Backoff, ChatStream, Connection, StateChange
from tokenwire.simulator import expected_final_answer

__all__ = ["StormResult", "gateway_refusals", "run_storm"]

#: Quick reconnects: the storm is the point, not a polite client.
STORM_BACKOFF = Backoff(initial_s=0.1, max_s=2.0, factor=2.0, jitter=0.5)


class _Recording(Connection):
    """The Python client, recording each request frame as it arrived (before the client drops
    what it holds already), so duplicates show."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrived: Counter[tuple[str, int]] = Counter()
        self.busy_resumes = 0
        #: When the victim was killed, and how long after it the first frame came again.
        self.killed_at: float | None = None
        self.resumed_after: float | None = None

    def _handle(self, message: str | bytes) -> None:
        frame = orjson.loads(message)
        if isinstance(frame, dict):
            if isinstance(frame.get("id"), str) and isinstance(frame.get("seq"), int):
                self.arrived[(frame["id"], frame["seq"])] += 1
                if self.killed_at is not None and self.resumed_after is None:
                    self.resumed_after = time.monotonic() - self.killed_at
            elif frame.get("code") == "too_busy" and frame.get("id"):
                self.busy_resumes += 1
        super()._handle(message)


@dataclass
class StormResult:
    clients: int
    completed: int = 0
    wrong: list[str] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)
    duplicates: int = 0
    #: Requests that ended in an ``error``, by code.
    errors: dict[str, int] = field(default_factory=dict)
    #: Seconds from the SIGKILL until that share of the answers were complete (an answer
    #: also takes its remaining tokens' time), and until that share of the clients had a
    #: frame again (reconnected and resumed: the storm itself).
    t50_s: float = 0.0
    t99_s: float = 0.0
    t100_s: float = 0.0
    resumed_t50_s: float = 0.0
    resumed_t99_s: float = 0.0
    resumed_t100_s: float = 0.0
    #: Seconds to connect every client, and from the chats to every answer under way.
    connect_s: float = 0.0
    start_s: float = 0.0
    #: Closes with 1013 (too_busy at the handshake) and too_busy resumes, as clients saw them.
    busy_closes: int = 0
    busy_resumes: int = 0
    reconnects: int = 0
    #: Frames each request had before the kill (the kill came mid-answer: all > 0), and
    #: answers already complete then (mid-answer means none).
    frames_before_kill_min: int = 0
    finished_before_kill: int = 0

    @property
    def problems(self) -> list[str]:
        out = [f"wrong answer: {rid}" for rid in self.wrong[:5]]
        out += [f"seq not 1..n once: {rid}" for rid in self.gaps[:5]]
        if self.duplicates:
            out.append(f"{self.duplicates} duplicate frames")
        if self.completed != self.clients:
            out.append(f"{self.clients - self.completed} answers incomplete")
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"problems": self.problems}


def _share_time(done_at: list[float], share: float) -> float:
    if not done_at:
        return float("nan")
    ordered = sorted(done_at)
    index = min(len(ordered) - 1, max(0, int(len(ordered) * share + 0.999999) - 1))
    return ordered[index]


async def run_storm(
    victim_url: str,
    survivor_urls: Sequence[str],
    kill: Callable[[], object],
    *,
    clients: int,
    tokens: int,
    delay_ms: int,
    timeout_s: float,
    connect_batch: int = 50,
) -> StormResult:
    """Open ``clients`` connections to ``victim_url``, one paced answer each; ``kill()`` the
    victim mid-answer; wait until every answer is complete (or ``timeout_s``); check them."""
    result = StormResult(clients=clients)
    conns: list[_Recording] = []
    streams: list[ChatStream] = []
    expected: dict[str, str] = {}
    closes: Counter[int] = Counter()

    def on_state(change: StateChange) -> None:
        if change.code is not None and change.delay_s:
            closes[change.code] += 1

    controls = {"delay_ms": delay_ms, "tokens": tokens}
    try:
        phase = time.monotonic()
        for start in range(0, clients, connect_batch):
            batch = []
            for i in range(start, min(clients, start + connect_batch)):
                conn = _Recording(
                    victim_url, user=f"storm-{i}", backoff=STORM_BACKOFF, urls=survivor_urls
                )
                conn.on_state.append(on_state)
                conns.append(conn)
                batch.append(conn.connect())
            await asyncio.gather(*batch)
        result.connect_s = time.monotonic() - phase
        phase = time.monotonic()
        for i, conn in enumerate(conns):
            query = f"storm {i}"
            rid = f"storm-{i}"
            expected[rid] = expected_final_answer(query, controls)
            streams.append(await conn.chat(query, id=rid, inputs={"tw_sim": controls}))

        # Mid-answer: every client holds part of its answer (accepted, start, a delta).
        async def holds_part(stream: ChatStream) -> None:
            async for frame in stream:
                if frame.seq is not None and frame.seq >= 3:
                    return

        await asyncio.wait_for(asyncio.gather(*(holds_part(s) for s in streams)), timeout_s)
        result.start_s = time.monotonic() - phase
        result.frames_before_kill_min = min(len(s.frames) for s in streams)
        result.finished_before_kill = sum(s.finished for s in streams)
        closes.clear()
        kill()
        killed_at = time.monotonic()
        for conn in conns:
            conn.killed_at = killed_at
        done_at: list[float] = []

        async def finish(stream: ChatStream) -> None:
            await stream.wait()
            done_at.append(time.monotonic() - killed_at)

        with_timeout = asyncio.wait_for(
            asyncio.gather(*(finish(s) for s in streams)), timeout=timeout_s
        )
        with contextlib.suppress(TimeoutError):
            await with_timeout
        result.t50_s = _share_time(done_at, 0.50)
        result.t99_s = _share_time(done_at, 0.99)
        result.t100_s = max(done_at) if len(done_at) == clients else float("nan")
        resumed = [c.resumed_after for c in conns if c.resumed_after is not None]
        result.resumed_t50_s = _share_time(resumed, 0.50)
        result.resumed_t99_s = _share_time(resumed, 0.99)
        result.resumed_t100_s = max(resumed) if len(resumed) == clients else float("nan")
        for stream in streams:
            seqs = [f.seq for f in stream.frames]
            if stream.end is not None:
                result.completed += 1
            elif stream.error is not None:
                code = stream.error.code
                result.errors[code] = result.errors.get(code, 0) + 1
            if seqs != list(range(1, len(seqs) + 1)):
                result.gaps.append(stream.id)
            if stream.text != expected[stream.id] or stream.end is None:
                result.wrong.append(stream.id)
        for conn in conns:
            result.duplicates += sum(n - 1 for n in conn.arrived.values() if n > 1)
            result.busy_resumes += conn.busy_resumes
        result.busy_closes = closes[1013]
        result.reconnects = sum(closes.values())
        return result
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


def gateway_refusals(metrics_url: str) -> dict[str, float]:
    """``tokenwire_gateway_refusals_total`` of one gateway, by kind."""
    text = httpx.get(metrics_url, timeout=5).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "tokenwire_gateway_refusals":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["kind"]] = sample.value
    return out


# --- the full-size run --------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from bench.loadgen import raise_nofile
    from bench.stats import cpu_seconds
    from bench.system import SimSpec, System

    parser = argparse.ArgumentParser(
        prog="python -m bench.storm", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=120, help="long enough to be mid-answer")
    parser.add_argument("--delay-ms", type=int, default=250, help="between two tokens")
    parser.add_argument("--max-handshakes", type=int, default=64, help="of each survivor")
    parser.add_argument("--max-resumes", type=int, default=64, help="of each survivor")
    parser.add_argument("--busy-retry-s", type=float, default=1.0)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument(
        "--partitions", type=int, default=1, help="TOKENWIRE_FRAME_PARTITIONS of every process"
    )
    parser.add_argument(
        "--no-kill",
        action="store_true",
        help="the control: the same load, the first gateway left alive (what the storm costs)",
    )
    parser.add_argument("--json", type=Path, help="write the result here too")
    args = parser.parse_args(argv)
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="tokenwire-storm-"))
    system = System(workdir)
    try:
        system.start_nats()
        system.start_simulator(SimSpec(token_delay_ms=args.delay_ms, tokens=args.tokens))
        layout = {"TOKENWIRE_FRAME_PARTITIONS": str(args.partitions)}
        system.start_worker(env=layout)
        victim = system.start_gateway(env=layout | {"TOKENWIRE_MAX_HANDSHAKES": str(args.clients)})
        caps = layout | {
            "TOKENWIRE_MAX_HANDSHAKES": str(args.max_handshakes),
            "TOKENWIRE_MAX_RESUMES": str(args.max_resumes),
            "TOKENWIRE_BUSY_RETRY_S": str(args.busy_retry_s),
        }
        survivors = [system.start_gateway(env=caps) for _ in range(2)]
        url = "ws://127.0.0.1:{}/v1/ws".format

        # Where the two cores went from the kill to the last answer: which process was busy.
        assert system.nats is not None and system.sim is not None
        pids = {
            "bench clients": os.getpid(),
            "nats-server": system.nats.pid,
            "simulator": system.sim.pid,
            "worker": system.workers[0].pid,
            "survivor 1": survivors[0].pid,
            "survivor 2": survivors[1].pid,
            "first gateway": victim.pid if args.no_kill else None,
        }
        watched = {name: pid for name, pid in pids.items() if pid is not None}
        cpu_at_kill: dict[str, float] = {}

        def kill() -> None:
            cpu_at_kill.update({name: cpu_seconds(pid) for name, pid in watched.items()})
            assert victim.popen is not None
            if not args.no_kill:
                victim.popen.kill()

        started = time.monotonic()
        result = asyncio.run(
            run_storm(
                url(victim.port),
                [url(s.port) for s in survivors],
                kill,
                clients=args.clients,
                tokens=args.tokens,
                delay_ms=args.delay_ms,
                timeout_s=args.timeout_s,
            )
        )
        cpu = {
            name: round(cpu_seconds(watched[name]) - was, 1) for name, was in cpu_at_kill.items()
        }
        refusals = [gateway_refusals(f"http://127.0.0.1:{s.port}/metrics") for s in survivors]
        report = result.as_dict() | {
            "cpu_s_after_kill": cpu,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "survivor_refusals": refusals,
            "survivors_alive": [s.popen is not None and s.popen.poll() is None for s in survivors],
            "wall_s": time.monotonic() - started,
        }
        print(json.dumps(report, indent=1))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        return 0 if not result.problems else 1
    except BaseException:
        print(system.logs(), file=sys.stderr)
        raise
    finally:
        system.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
