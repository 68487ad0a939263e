"""The soak (issue 17): idle connections and a steady chat load for a long time; nothing grows.

    .venv/bin/python -m bench.soak [--idle 10000] [--duration-s 600] [--chat-every-s 0.1]
                                   [--sample-s 10] [--warmup-s 60] [--json F]

How this works: one gateway, one worker, the simulator, NATS. ``--idle`` connections are
opened and kept open (each sends a ``ping`` frame every ``IDLE_PING_S``, as the SDK does, so
the idle timeout does not close them); one Python client starts a chat every
``--chat-every-s`` and checks every answer against the simulator's exact text with each
``seq`` exactly once. Every ``--sample-s`` the sampler reads the gateway's and the worker's
RSS (/proc), their asyncio task counts (``tokenwire_*_asyncio_tasks`` on /metrics) and the
NATS subscriptions of all clients (nats-server ``/connz?subs=1``). After ``--warmup-s`` the
samples are split in halves: a leak shows as the second half above the first (the load is
constant, so counts per connection do not matter, only growth over time).

:func:`run_soak` is shared with ``tests/integration/test_soak.py`` (a 2-minute version).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import orjson
import websockets
from prometheus_client.parser import text_string_to_metric_families
from websockets.typing import Subprotocol

from tokenwire.client import Backoff, ChatStream, Connection
from tokenwire.simulator import expected_final_answer

__all__ = ["Growth", "Sample", "SoakResult", "Target", "run_soak"]

PROTOCOL: Final = Subprotocol("tokenwire.v1")
#: How often an idle connection says it is alive (the SDK's default ping interval).
IDLE_PING_S = 20.0


@dataclass(frozen=True)
class Target:
    """Where to read one process: its pid and its /metrics URL; and NATS' monitor."""

    gateway_pid: int
    gateway_metrics: str
    worker_pid: int
    worker_metrics: str
    nats_monitor: str


@dataclass(frozen=True)
class Sample:
    t_s: float
    gateway_rss_kib: int
    worker_rss_kib: int
    gateway_tasks: float
    worker_tasks: float
    nats_subscriptions: int
    nats_connections: int
    chats_done: int


@dataclass(frozen=True)
class Growth:
    """One series after warm-up: mean of its first half, of its second half."""

    first: float
    second: float

    @property
    def ratio(self) -> float:
        return (self.second - self.first) / self.first if self.first else 0.0

    def within(self, ratio: float, slack: float) -> bool:
        """Whether the second half is at most ``ratio`` (plus ``slack``, absolute) above."""
        return self.second <= self.first * (1 + ratio) + slack


@dataclass
class SoakResult:
    idle: int
    chats: int = 0
    wrong: list[str] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)
    idle_lost: int = 0
    samples: list[Sample] = field(default_factory=list)
    warmup_s: float = 0.0

    def growth(self, name: str) -> Growth:
        """The series ``name`` after warm-up, half against half: means for RSS, medians for
        counts (tasks and subscriptions jump with the chats in flight at the instant of a
        sample; a leak lifts the median, a busy instant does not)."""
        after = [s for s in self.samples if s.t_s >= self.warmup_s]
        values = [float(getattr(s, name)) for s in after]
        if len(values) < 4:
            raise ValueError(f"too few samples after warm-up ({len(values)}): sample more often")
        half = len(values) // 2
        stat = statistics.fmean if name.endswith("_kib") else statistics.median
        return Growth(stat(values[:half]), stat(values[half:]))

    def summary(self) -> dict[str, Any]:
        names = (
            "gateway_rss_kib",
            "worker_rss_kib",
            "gateway_tasks",
            "worker_tasks",
            "nats_subscriptions",
        )
        return {
            "idle": self.idle,
            "chats": self.chats,
            "wrong": self.wrong[:5],
            "gaps": self.gaps[:5],
            "idle_lost": self.idle_lost,
            "warmup_s": self.warmup_s,
            "growth": {n: asdict(self.growth(n)) | {"ratio": self.growth(n).ratio} for n in names},
            "samples": [asdict(s) for s in self.samples],
        }


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def _gauge(http: httpx.AsyncClient, url: str, name: str) -> float:
    text = (await http.get(url, timeout=10)).text
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return float(family.samples[0].value)
    return float("nan")


async def _nats(http: httpx.AsyncClient, monitor: str) -> tuple[int, int]:
    """(subscriptions, connections) over every client of the server."""
    subs = conns = 0
    offset = 0
    while True:
        page = (
            await http.get(f"{monitor}/connz", params={"subs": 1, "offset": offset, "limit": 1024})
        ).json()
        for conn in page.get("connections") or []:
            subs += int(conn.get("subscriptions") or 0)
            conns += 1
        offset += page.get("limit", 1024)
        if offset >= page.get("total", 0):
            return subs, conns


async def _open_idle(url: str, user: str) -> Any:
    """One idle connection, once it has its ``hello``: a gateway at its handshake cap says
    ``too_busy`` and closes (1013), and the connection is tried again after the hint."""
    while True:
        ws = await websockets.connect(f"{url}?user={user}", subprotocols=[PROTOCOL])
        first = orjson.loads(await ws.recv())
        if first.get("type") == "hello":
            return ws
        await ws.close()
        await asyncio.sleep((first.get("retry_after_ms") or 1000) / 1000 * random.uniform(1, 1.5))


async def _drain(ws: Any) -> None:
    """Read what the gateway sends an idle connection (its ``pong`` frames), as every client
    does. Unread, they fill websockets' receive queue (16 messages), the library stops reading
    the socket, the gateway's WebSocket pings go unanswered and it closes the connection
    (1011): the first 10,000 × 10-minute soak lost every idle connection that way at ~350 s."""
    with contextlib.suppress(websockets.ConnectionClosed):
        async for _ in ws:
            pass


async def _idle(
    url: str, count: int, stop: asyncio.Event, lost: list[int], ping_s: float = IDLE_PING_S
) -> None:
    """``count`` idle connections, each pinging every ``ping_s``, until ``stop``."""
    sockets: list[Any] = []
    readers: list[asyncio.Task[None]] = []
    try:
        for start in range(0, count, 50):
            users = range(start, min(count, start + 50))
            opened = await asyncio.gather(*(_open_idle(url, f"idle-{i}") for i in users))
            sockets += opened
            readers += [asyncio.create_task(_drain(ws)) for ws in opened]
        ping = orjson.dumps({"type": "ping"}).decode()
        while not stop.is_set():
            sweep_started = time.monotonic()
            for ws in sockets:
                with contextlib.suppress(websockets.ConnectionClosed):
                    await ws.send(ping)
            with contextlib.suppress(TimeoutError):
                remaining = ping_s - (time.monotonic() - sweep_started)
                await asyncio.wait_for(stop.wait(), max(0.1, remaining))
        lost.append(sum(1 for ws in sockets if ws.close_code is not None))
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def run_soak(
    gateway_url: str,
    target: Target,
    *,
    idle: int,
    duration_s: float,
    chat_every_s: float,
    sample_s: float,
    warmup_s: float,
    tokens: int = 20,
    delay_ms: int = 20,
    idle_ping_s: float = IDLE_PING_S,
) -> SoakResult:
    """Hold ``idle`` connections (a ``ping`` frame from each every ``idle_ping_s``) and chat
    every ``chat_every_s`` for ``duration_s``, sampling every ``sample_s``; each answer is
    checked when it ends."""
    result = SoakResult(idle=idle, warmup_s=warmup_s)
    stop = asyncio.Event()
    lost: list[int] = []
    idle_task = asyncio.create_task(_idle(gateway_url, idle, stop, lost, idle_ping_s))
    conn = Connection(
        gateway_url, user="soak-chat", backoff=Backoff(initial_s=0.1, max_s=2.0, jitter=0.5)
    )
    controls = {"delay_ms": delay_ms, "tokens": tokens}
    pending: set[asyncio.Task[None]] = set()

    async def check(stream: ChatStream, expected: str) -> None:
        await stream.wait()
        result.chats += 1
        if [f.seq for f in stream.frames] != list(range(1, len(stream.frames) + 1)):
            result.gaps.append(stream.id)
        if stream.end is None or stream.text != expected:
            why = stream.error.code if stream.error is not None else "text differs"
            result.wrong.append(f"{stream.id} ({why})")

    async def chats() -> None:
        n = 0
        next_at = time.monotonic()
        while not stop.is_set():
            n += 1
            query = f"soak {n}"
            stream = await conn.chat(query, id=f"soak-{n}", inputs={"tw_sim": controls})
            task = asyncio.create_task(check(stream, expected_final_answer(query, controls)))
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_at += chat_every_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))

    try:
        await conn.connect()
        while not idle_task.done() and len(lost) == 0:
            # The idle connections are open once the gateway counts them (hello sent).
            async with httpx.AsyncClient() as http:
                open_now = await _gauge(
                    http, target.gateway_metrics, "tokenwire_gateway_connections"
                )
            if open_now >= idle + 1:
                break
            await asyncio.sleep(0.2)
        if idle_task.done():
            idle_task.result()  # raises why the idle connections could not open
        started = time.monotonic()
        chatter = asyncio.create_task(chats())
        # A fresh connection per scrape: a server may close a kept-alive one just as it is
        # reused (the worker's metrics server does, every few minutes).
        no_keepalive = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=no_keepalive) as http:
            while (elapsed := time.monotonic() - started) < duration_s:
                subs, conns = await _nats(http, target.nats_monitor)
                result.samples.append(
                    Sample(
                        t_s=round(elapsed, 2),
                        gateway_rss_kib=_rss_kib(target.gateway_pid),
                        worker_rss_kib=_rss_kib(target.worker_pid),
                        gateway_tasks=await _gauge(
                            http, target.gateway_metrics, "tokenwire_gateway_asyncio_tasks"
                        ),
                        worker_tasks=await _gauge(
                            http, target.worker_metrics, "tokenwire_worker_asyncio_tasks"
                        ),
                        nats_subscriptions=subs,
                        nats_connections=conns,
                        chats_done=result.chats,
                    )
                )
                await asyncio.sleep(max(0.0, sample_s - (time.monotonic() - started - elapsed)))
        stop.set()
        await chatter
        await asyncio.wait_for(asyncio.gather(*pending), 60)
        await idle_task
        result.idle_lost = lost[0] if lost else idle
        return result
    finally:
        stop.set()
        for task in pending:
            task.cancel()
        await conn.close()
        if not idle_task.done():
            idle_task.cancel()
        with contextlib.suppress(BaseException):
            await idle_task


# --- the full-size run --------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from bench.loadgen import raise_nofile
    from bench.system import SimSpec, System

    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--chat-every-s", type=float, default=0.1)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=60.0)
    parser.add_argument("--json", type=Path, help="write the result here too")
    args = parser.parse_args(argv)
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="tokenwire-soak-"))
    system = System(workdir)
    try:
        system.start_nats()
        assert system.nats is not None
        system.start_simulator(SimSpec(token_delay_ms=20, tokens=20))
        worker = system.start_worker()
        # The one chatting user runs many answers at once on one connection.
        lifted = {
            "TOKENWIRE_MAX_INFLIGHT_PER_CONNECTION": "512",
            "TOKENWIRE_MAX_INFLIGHT_PER_USER": "512",
        }
        gateway = system.start_gateway(env=lifted)
        target = Target(
            gateway_pid=gateway.pid,
            gateway_metrics=f"http://127.0.0.1:{gateway.port}/metrics",
            worker_pid=worker.pid,
            worker_metrics=f"http://127.0.0.1:{worker.port}/metrics",
            nats_monitor=system.nats.monitor_url,
        )
        result = asyncio.run(
            run_soak(
                f"ws://127.0.0.1:{gateway.port}/v1/ws",
                target,
                idle=args.idle,
                duration_s=args.duration_s,
                chat_every_s=args.chat_every_s,
                sample_s=args.sample_s,
                warmup_s=args.warmup_s,
            )
        )
        report = result.summary() | {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        }
        print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
        return 0 if not (result.wrong or result.gaps or result.idle_lost) else 1
    except BaseException:
        print(system.logs(), file=sys.stderr)
        raise
    finally:
        system.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
