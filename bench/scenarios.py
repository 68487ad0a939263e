"""The measurements, one function per section of docs/benchmarks.md.

Each takes the running :class:`~bench.system.System` and the :class:`Plan` and returns plain
data (JSON-able) that :mod:`bench.report` turns into tables and charts. Every load also lands
in ``runs`` with its correctness counts (streams, complete, wrong, failed): a number from a
load that lost or garbled answers is not a number.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from bench import long_answer
from bench.loadgen import LoadResult, LoadSpec, run_load
from bench.stats import ForeignLoad, Profiler, cpu_seconds, dist_ms, summarize_profile
from bench.system import Proc, SimSpec, System, rss_kib

__all__ = ["Plan", "Recorder"]

DELAY_BOUND_MS = 50.0


@dataclass
class Plan:
    """Every count and duration of one run; :meth:`full` and :meth:`quick` are the two modes."""

    mode: str
    processes: int
    ttft_sim: SimSpec
    ttft_levels: list[int]
    ttft_rounds: dict[int, int]
    tput_sim: SimSpec
    tput_connections: int
    tput_window_s: float
    idle_levels: list[int]
    idle_processes: int
    ramp_sim: SimSpec
    ramp_levels: list[int]
    ramp_rounds: int
    ramp_targets: list[str]
    topology_ramp: bool
    levers: list[tuple[str, list[str]]]
    lever_idle: int
    profile: bool
    tput_tries: int = 2
    coalescing: list[int] = field(default_factory=lambda: [1, 4])
    idle_hold_s: float = 5.0
    worker_lever_min_streams: int = 100
    worker_variants: list[tuple[str, list[str], list[str]]] = field(
        default_factory=lambda: [
            ("as shipped (jobs pulled in batches)", [], []),
            ("one job per pull (before)", ["--pull-batch", "1"], []),
        ]
    )
    tuned_ramp: tuple[list[str], list[str]] | None = None
    # The issue-13 figures (section "tokens at the upstream's speed"), each measured with the
    # worker as shipped and with coalescing off (TOKENWIRE_COALESCE_MS=0: the old path).
    upstream_connections: int = 50
    upstream_tput_sim: SimSpec = field(default_factory=lambda: SimSpec(0, 400))
    upstream_window_s: float = 8.0
    upstream_ttft_sim: SimSpec = field(default_factory=lambda: SimSpec(40, 10))
    upstream_ttft_rounds: int = 20
    upstream_bursts: int = 3
    upstream_fast_sim: SimSpec = field(default_factory=lambda: SimSpec(5, 200))
    upstream_fast_rounds: int = 3
    # Section "long answers" (issue 17): one unpaced answer of each size, end to end.
    long_sizes: list[int] = field(default_factory=lambda: [100, 1_000, 10_000, 100_000])
    long_budget: int = 100_000  # tokens timed per size (short answers: several rounds)
    worker_settings: list[tuple[str, dict[str, str]]] = field(
        default_factory=lambda: [
            ("coalescing on (as shipped, 16 ms)", {}),
            ("coalescing off (one frame per token)", {"TOKENWIRE_COALESCE_MS": "0"}),
        ]
    )

    @classmethod
    def full(cls) -> Plan:
        return cls(
            mode="full",
            processes=2,
            # 25 tokens/s, 2 s answers: a typical LLM pace (the same as the ramp's).
            ttft_sim=SimSpec(token_delay_ms=40, tokens=50),
            ttft_levels=[1, 50, 200],
            ttft_rounds={1: 15, 50: 3, 200: 3},
            tput_sim=SimSpec(token_delay_ms=0, tokens=200),
            tput_connections=100,
            tput_window_s=8.0,
            idle_levels=[1000, 5000, 10000],
            idle_processes=4,
            ramp_sim=SimSpec(token_delay_ms=40, tokens=50),
            ramp_levels=[50, 100, 200, 300, 400, 600, 800, 1200, 1600, 2000, 2400, 3200],
            ramp_rounds=3,
            ramp_targets=["tokenwire", "tutorial", "sse", "bare"],
            topology_ramp=True,
            # The gateway's server levers were measured in full before (docs/benchmarks.md
            # history); this run keeps the two that matter for memory.
            levers=[
                ("as shipped: uvicorn, uvloop, websockets-sansio, no deflate", []),
                ("ws=wsproto", ["--ws", "wsproto"]),
            ],
            lever_idle=2000,
            profile=True,
        )

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            mode="quick",
            processes=1,
            ttft_sim=SimSpec(token_delay_ms=10, tokens=20),
            ttft_levels=[1, 4],
            ttft_rounds={1: 4, 4: 4},
            tput_sim=SimSpec(token_delay_ms=0, tokens=60),
            tput_connections=6,
            tput_window_s=2.0,
            idle_levels=[100],
            idle_processes=1,
            ramp_sim=SimSpec(token_delay_ms=20, tokens=20),
            ramp_levels=[4],
            ramp_rounds=3,
            ramp_targets=["tokenwire", "tutorial", "sse"],
            topology_ramp=False,
            levers=[
                ("as shipped: uvicorn, uvloop, websockets-sansio, no deflate", []),
                ("permessage-deflate on", ["--deflate"]),
            ],
            lever_idle=100,
            profile=False,
            tput_tries=1,
            coalescing=[],
            idle_hold_s=1.0,
            worker_lever_min_streams=0,
            worker_variants=[
                ("as shipped", [], []),
                ("one job per pull (before)", ["--pull-batch", "1"], []),
            ],
            tuned_ramp=None,
            # One simulator for every stage of the smoke run: no restarts.
            upstream_connections=4,
            upstream_tput_sim=SimSpec(5, 20),
            upstream_window_s=1.0,
            upstream_ttft_sim=SimSpec(5, 20),
            upstream_ttft_rounds=2,
            upstream_bursts=1,
            upstream_fast_sim=SimSpec(5, 20),
            upstream_fast_rounds=1,
            long_sizes=[100, 5_000],
            long_budget=2_000,
        )

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("ttft_sim", "tput_sim", "ramp_sim", "upstream_tput_sim", "upstream_ttft_sim",
                    "upstream_fast_sim"):  # fmt: skip
            spec: SimSpec = getattr(self, key)
            data[key] = {**asdict(spec), "tokens_per_s": spec.tokens_per_s}
        data["levers"] = [name for name, _ in self.levers]
        return data


def _answer_s(spec: SimSpec) -> float:
    """How long one answer takes at the simulator's pace (first token after one delay)."""
    return spec.tokens * spec.token_delay_ms / 1000


def _log_marks(procs: list[Proc]) -> dict[Path, int]:
    return {p.log_path: p.log_path.stat().st_size if p.log_path.exists() else 0 for p in procs}


def _log_events(marks: dict[Path, int], message: str) -> dict[str, float]:
    """trace_id → time (epoch s) of the JSON log lines saying ``message`` since ``marks``."""
    found: dict[str, float] = {}
    for path, offset in marks.items():
        with path.open("rb") as log:
            log.seek(offset)
            for raw in log:
                if message.encode() not in raw:
                    continue
                try:
                    entry = json.loads(raw)
                    stamp = dt.datetime.fromisoformat(entry["ts"].replace("Z", "+00:00"))
                    found[entry["trace_id"]] = stamp.timestamp()
                except (ValueError, KeyError, TypeError):
                    continue
    return found


def queue_wait_ms(
    gateway_marks: dict[Path, int], worker_marks: dict[Path, int]
) -> dict[str, float]:
    """How long jobs waited between the gateway's ``chat accepted`` and a worker's ``job
    started`` (from the JSON logs, joined on trace_id; millisecond stamps). Empty if the logs
    do not say."""
    accepted = _log_events(gateway_marks, '"chat accepted"')
    started = _log_events(worker_marks, '"job started"')
    waits = [started[t] - accepted[t] for t in started if t in accepted]
    return dist_ms(waits) if waits else {}


def _machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


@dataclass
class Recorder:
    """Holds the system, the plan and the results; one method per section."""

    system: System
    plan: Plan
    workdir: Path
    console: Console = field(default_factory=Console)
    results: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    progress: Progress | None = None

    # --- plumbing -----------------------------------------------------------------------------

    def _urls(self, kind: str, gateways: list[Proc] | None = None) -> list[str]:
        system = self.system
        if kind == "sse":
            return [system.sim_url]
        if kind == "tutorial":
            return [f"ws://127.0.0.1:{self._tutorial().port}/ws"]
        if kind == "bare":
            return [f"ws://127.0.0.1:{self._bare().port}/v1/ws"]
        return [f"ws://127.0.0.1:{gw.port}/v1/ws" for gw in gateways or system.gateways]

    def _tutorial(self) -> Proc:
        for proc in self.system.extra:
            if proc.name == "tutorial-bridge":
                return proc
        return self.system.start_tutorial()

    def _bare(self) -> Proc:
        """The newest bare server (a variant while one runs)."""
        for proc in reversed(self.system.extra):
            if proc.name.startswith("bare-ws"):
                return proc
        raise RuntimeError("bare server not started")

    def _restart_bare(self, spec: SimSpec) -> None:
        for proc in list(self.system.extra):
            if proc.name == "bare-ws":
                self.system.stop(proc)
        self.system.start_bare(spec)

    def load(
        self,
        section: str,
        kind: str,
        spec_sim: SimSpec,
        connections: int,
        *,
        gateways: list[Proc] | None = None,
        record: bool = True,
        on_go: Callable[[float], None] | None = None,
        label_suffix: str = "",
        **fields: Any,
    ) -> LoadResult:
        spec = LoadSpec(
            kind=kind,  # type: ignore[arg-type]
            urls=self._urls(kind, gateways),
            connections=connections,
            tokens=spec_sim.tokens,
            token_delay_ms=spec_sim.token_delay_ms,
            processes=fields.pop("processes", self.plan.processes),
            label=f"{section}: {kind} ×{connections} {label_suffix}".rstrip(),
            **fields,
        )
        result = run_load(spec, progress=self.progress, on_go=on_go)
        if record:
            self.runs.append({"section": section, **result.summary()})
        if result.wrong or result.failed or result.timed_out:
            self.console.print(
                f"[yellow]{spec.label}: {result.complete}/{result.streams} complete, "
                f"{result.wrong} wrong, {result.failed} failed; {result.errors[:2]}"
            )
        return result

    def warmup(self, kind: str, spec_sim: SimSpec, gateways: list[Proc] | None = None) -> None:
        """A few streams, not recorded: pools filled, code paths warm, stale sockets gone."""
        self.load("warm-up", kind, spec_sim, 4, gateways=gateways, rounds=2, record=False,
                  processes=1, timeout_s=60)  # fmt: skip

    # --- 1. time to first token ---------------------------------------------------------------

    def ttft(self) -> None:
        plan, sim = self.plan, self.plan.ttft_sim
        self.system.start_simulator(sim)
        answer = _answer_s(sim)
        kinds = ["sse", "tokenwire", "tutorial"]
        for kind in kinds:
            self.warmup(kind, sim)
        levels = []
        for level in plan.ttft_levels:
            rounds = plan.ttft_rounds[level]
            row: dict[str, Any] = {"concurrency": level}
            for kind in kinds:
                staggered = level > 1
                on_go = None
                profiler = Profiler(self.workdir / f"paced-{level}")
                if plan.profile and kind == "tokenwire" and level == plan.ttft_levels[-1]:
                    on_go = self._profile_on_go(profiler, answer, answer * (rounds - 1))
                gw_marks = _log_marks(self.system.gateways)
                wk_marks = _log_marks(self.system.workers)
                result = self.load(
                    "ttft", kind, sim, level, on_go=on_go,
                    rounds=rounds,
                    stagger_s=answer if staggered else 0.0,
                    # Steady state only: after every connection has started, before any ends.
                    measure_from_s=answer if staggered else None,
                    measure_to_s=answer * rounds if staggered else None,
                    timeout_s=120 + rounds * answer * 4,
                )  # fmt: skip
                row[kind] = dist_ms(result.ttft_s)
                if kind == "tokenwire":
                    row["queue_wait_ms"] = queue_wait_ms(gw_marks, wk_marks)
                if on_go is not None:
                    self._keep_profiles(profiler, f"{level} paced streams")
            for kind in ("tokenwire", "tutorial"):
                row[f"{kind}_added"] = {
                    q: row[kind][q] - row["sse"][q] for q in ("p50", "p90", "p99")
                }
            levels.append(row)
        self.results["ttft"] = {"sim": asdict(sim), "levels": levels}

    def _profile_on_go(
        self, profiler: Profiler, delay_s: float, seconds: float
    ) -> Callable[[float], None]:
        pids = {"gateway": self.system.gateways[0].pid, "worker": self.system.workers[0].pid}

        def on_go(start_at: float) -> None:
            def begin() -> None:
                for name, pid in pids.items():
                    profiler.start(name, pid, seconds)

            wait = max(0.0, start_at - time.monotonic()) + delay_s
            threading.Timer(wait, begin).start()

        return on_go

    def _keep_profiles(self, profiler: Profiler, load: str) -> None:
        own = ("gateway/", "worker/", "shared/")
        for name, path in profiler.finish().items():
            self.results.setdefault("profile", {})[f"{name}, {load}"] = summarize_profile(
                path, own=own
            )

    # --- 2. throughput against the bare server -----------------------------------------------

    def _tput_run(self, kind: str, label: str, gateways: list[Proc] | None = None,
                  profile: bool = False) -> dict[str, Any]:  # fmt: skip
        """The throughput load ``plan.tput_tries`` times; the best window counts (other
        people's work on a shared machine only ever makes a window slower)."""
        rows = [
            self._tput_once(kind, label, gateways, profile=profile and i == 0)
            for i in range(self.plan.tput_tries)
        ]
        best = max(rows, key=lambda r: r["tokens_per_s"])
        best["tries_frames_per_s"] = [r["frames_per_s"] for r in rows]
        best["tries_tokens_per_s"] = [r["tokens_per_s"] for r in rows]
        best["complete"] = sum(r["complete"] for r in rows)
        best["streams"] = sum(r["streams"] for r in rows)
        return best

    def _tput_once(self, kind: str, label: str, gateways: list[Proc] | None = None,
                   profile: bool = False, sim: SimSpec | None = None,
                   connections: int | None = None, window_s: float | None = None,
                   section: str = "throughput") -> dict[str, Any]:  # fmt: skip
        plan, system = self.plan, self.system
        sim = sim or plan.tput_sim
        window_s = window_s or plan.tput_window_s
        connections = connections or plan.tput_connections
        watched: dict[str, Proc] = {}
        if kind in ("tokenwire", "sse"):
            watched["simulator"] = system.sim  # type: ignore[assignment]
        if kind == "tokenwire":
            for i, gw in enumerate(gateways or system.gateways):
                watched[f"gateway{i + 1}"] = gw
            for i, wk in enumerate(system.workers):
                watched[f"worker{i + 1}"] = wk
        if kind == "tutorial":
            watched["tutorial-bridge"] = self._tutorial()
            watched["simulator"] = system.sim  # type: ignore[assignment]
        if kind == "bare":
            watched["bare-ws"] = self._bare()
        pids = {name: proc.pid for name, proc in watched.items()}
        if kind == "tokenwire" and system.nats is not None and system.nats.pid:
            pids["nats-server"] = system.nats.pid
        cpu: dict[str, Any] = {}
        profiler = Profiler(self.workdir)

        def sample(tag: str) -> None:
            cpu[tag] = {name: cpu_seconds(pid) for name, pid in pids.items()}
            cpu[tag + "_machine"] = _machine_busy()

        def on_go(start_at: float) -> None:
            delay = max(0.0, start_at - time.monotonic())
            window = window_s
            threading.Timer(delay, sample, ("start",)).start()
            threading.Timer(delay + window, sample, ("end",)).start()
            if profile and profiler.available:
                for name in ("gateway1", "worker1", "simulator"):
                    if name in pids:
                        profiler.start(name, pids[name], window)

        result = self.load(
            section, kind, sim, connections, gateways=gateways, on_go=on_go,
            window_s=window_s, timeout_s=window_s + 120,
        )  # fmt: skip
        time.sleep(0.2)
        row: dict[str, Any] = {
            "name": label,
            "kind": kind,
            "frames_per_s": result.frames_per_s,
            "tokens_per_s": result.tokens_per_s,
            "complete": result.complete,
            "streams": result.streams,
        }
        if "start" in cpu and "end" in cpu:
            window = window_s
            row["cpu_pct"] = {
                name: 100 * (cpu["end"][name] - cpu["start"][name]) / window for name in pids
            }
            busy0, total0 = cpu["start_machine"]
            busy1, total1 = cpu["end_machine"]
            row["machine_busy_pct"] = 100 * (busy1 - busy0) / max(1, total1 - total0)
            if result.frames:
                row["cpu_us_per_frame"] = {
                    name: 1e6 * (cpu["end"][name] - cpu["start"][name]) / result.frames
                    for name in pids
                }
            if result.tokens:
                row["cpu_us_per_token"] = {
                    name: 1e6 * (cpu["end"][name] - cpu["start"][name]) / result.tokens
                    for name in pids
                }
                row["frames_per_token"] = result.frames / result.tokens
        if profile:
            self._keep_profiles(profiler, "throughput window")
        return row

    def throughput(self, topology_only: bool = False) -> None:
        """Unpaced answers on many connections for a fixed window; frames/s at the clients."""
        plan, sim, system = self.plan, self.plan.tput_sim, self.system
        system.start_simulator(sim)
        self._restart_bare(sim)
        rows = []
        for kind, label in [
            ("bare", "bare Starlette WebSocket (ceiling)"),
            ("tokenwire", "tokenwire, 1 gateway + 1 worker"),
            ("tutorial", "tutorial bridge (baseline)"),
            ("sse", "direct SSE from the simulator"),
        ]:
            self.warmup(kind, sim)
            rows.append(self._tput_run(kind, label, profile=plan.profile and kind == "tokenwire"))
        # Tokens (Dify events carried), not frames: a coalesced delta carries several.
        bare, sse = rows[0]["tokens_per_s"], rows[3]["tokens_per_s"]
        self.results["throughput"] = {
            "sim": asdict(sim),
            "connections": plan.tput_connections,
            "window_s": plan.tput_window_s,
            "rows": rows,
            "ratio_vs_bare": rows[1]["tokens_per_s"] / bare if bare else math.nan,
            "ratio_vs_sse": rows[1]["tokens_per_s"] / sse if sse else math.nan,
        }

    # --- 3. idle memory --------------------------------------------------------------------------

    def _idle(
        self, server: str, proc: Proc, count: int, target: str = "tokenwire"
    ) -> dict[str, Any]:
        time.sleep(0.5)
        before = rss_kib(proc.pid)
        seen: dict[str, float] = {}

        def measure(opened: int) -> None:
            time.sleep(1.0)
            seen["after"] = rss_kib(proc.pid)
            seen["opened"] = opened
            # What holding them costs: the server's CPU while nothing is asked of it.
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(self.plan.idle_hold_s)
            seen["cpu_pct"] = 100 * (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)

        url = (
            f"ws://127.0.0.1:{proc.port}/ws"
            if target == "tutorial"
            else f"ws://127.0.0.1:{proc.port}/v1/ws"
        )
        spec = LoadSpec(
            kind="idle",
            urls=[url],
            connections=count,
            idle_target=target,  # type: ignore[arg-type]
            processes=self.plan.idle_processes,
            timeout_s=180 + count / 50,
            label=f"idle: {server} ×{count}",
        )
        result = run_load(spec, while_idle=measure, progress=self.progress)
        self.runs.append({"section": "idle", **result.summary()})
        opened = int(seen.get("opened", 0))
        after = seen.get("after", before)
        return {
            "server": server,
            "connections": count,
            "opened": opened,
            "rss_before_kib": before,
            "rss_after_kib": after,
            "per_conn_kib": (after - before) / opened if opened else math.nan,
            "idle_cpu_pct": seen.get("cpu_pct", math.nan),
        }

    def idle(self) -> None:
        """RSS per idle connection: a fresh server per level, delta of VmRSS over N."""
        plan, system = self.plan, self.system
        rows = []
        top = plan.idle_levels[-1]
        for level in plan.idle_levels:
            gw = system.start_gateway()
            rows.append(self._idle("tokenwire gateway", gw, level))
            system.stop(gw)
        bare = system.start_bare(plan.tput_sim, "--no-deflate")
        rows.append(self._idle("bare Starlette WebSocket, no deflate", bare, top))
        system.stop(bare)
        bare = system.start_bare(plan.tput_sim)
        rows.append(self._idle("bare Starlette WebSocket", bare, top))
        system.stop(bare)
        for proc in list(system.extra):
            if proc.name == "tutorial-bridge":
                system.stop(proc)
        tutorial = system.start_tutorial()
        rows.append(self._idle("tutorial bridge", tutorial, top, target="tutorial"))
        system.stop(tutorial)
        self.results["idle"] = {"rows": rows}

    # --- 4./5. most concurrent streams within the delay bound ----------------------------------

    def _ramp_step(self, kind: str, streams: int, gateways: list[Proc] | None) -> dict[str, Any]:
        plan, sim = self.plan, self.plan.ramp_sim
        answer = _answer_s(sim)
        rounds = plan.ramp_rounds
        gw_marks = _log_marks(self.system.gateways)
        wk_marks = _log_marks(self.system.workers)
        result = self.load(
            "ramp", kind, sim, streams, gateways=gateways,
            rounds=rounds, stagger_s=answer,
            measure_from_s=answer, measure_to_s=answer * rounds,
            timeout_s=120 + answer * rounds * 6, stream_timeout_s=60,
        )  # fmt: skip
        gaps = dist_ms(result.gaps_s)
        nominal = sim.token_delay_ms
        added = gaps["p99"] - nominal
        ok = (
            not result.timed_out
            and result.failed == 0
            and result.wrong == 0
            and result.complete == result.streams
            and not math.isnan(added)
            and added <= DELAY_BOUND_MS
        )
        return {
            "streams": streams,
            "gap_p50_ms": gaps["p50"],
            "gap_p99_ms": gaps["p99"],
            "added_p99_ms": added,
            "ttft_p99_ms": dist_ms(result.ttft_s)["p99"],
            "complete": result.complete,
            "total": result.streams,
            "pass": ok,
            "queue_wait_ms": queue_wait_ms(gw_marks, wk_marks) if kind == "tokenwire" else {},
        }

    def _ramp(self, kind: str, levels: list[int], gateways: list[Proc] | None = None
              ) -> tuple[list[dict[str, Any]], int | None, bool]:  # fmt: skip
        """Step up until the bound breaks, then one step halfway back; returns the steps, the
        most streams that held the bound, and whether the ladder ended without a failure."""
        steps: list[dict[str, Any]] = []
        best: int | None = None
        failed_at: int | None = None
        for level in levels:
            step = self._ramp_step(kind, level, gateways)
            steps.append(step)
            self.console.print(
                f"  ramp {kind} {level}: p99 gap {step['gap_p99_ms']:.1f} ms "
                f"(+{step['added_p99_ms']:.1f}), {step['complete']}/{step['total']} "
                f"{'ok' if step['pass'] else 'OVER'}"
            )
            if not step["pass"]:
                failed_at = level
                break
            best = level
        if failed_at is not None and best is not None and failed_at > best * 1.3:
            mid = (best + failed_at) // 2
            step = self._ramp_step(kind, mid, gateways)
            steps.append(step)
            if step["pass"]:
                best = mid
        # Broke the bound at the first step: halve (a few times at most) to find what holds.
        low = levels[0] // 2 if best is None and levels else 0
        while best is None and low >= max(2, levels[0] // 8):
            step = self._ramp_step(kind, low, gateways)
            steps.append(step)
            if step["pass"]:
                best = low
            low //= 2
        steps.sort(key=lambda s: s["streams"])
        return steps, best, failed_at is None

    def ramp(self) -> None:
        plan, sim, system = self.plan, self.plan.ramp_sim, self.system
        system.start_simulator(sim)
        series: dict[str, Any] = {}
        best: dict[str, Any] = {}
        open_ended: dict[str, bool] = {}
        for kind in plan.ramp_targets:
            if kind == "bare":
                self._restart_bare(sim)
            self.warmup(kind, sim)
            series[kind], best[kind], open_ended[kind] = self._ramp(kind, plan.ramp_levels)
        self.results["ramp"] = {
            "sim": asdict(sim),
            "bound_ms": DELAY_BOUND_MS,
            "series": series,
            "max": best,
            "ladder_top": plan.ramp_levels[-1],
            "open_ended": open_ended,
        }

    # --- 6. one gateway + one worker against two + two -----------------------------------------

    def topology(self) -> None:
        """Two gateways + two workers against the 1 + 1 numbers measured above."""
        plan, system = self.plan, self.system
        one: dict[str, Any] = {"layout": "1 gateway + 1 worker"}
        ramp = self.results.get("ramp", {})
        if "tokenwire" in ramp.get("max", {}):
            one["max_streams"] = ramp["max"]["tokenwire"]
        tput_rows = self.results.get("throughput", {}).get("rows", [])
        for row in tput_rows:
            if row["kind"] == "tokenwire":
                one |= {k: row.get(k) for k in ("frames_per_s", "tokens_per_s", "cpu_pct",
                                                "machine_busy_pct")}  # fmt: skip
        two: dict[str, Any] = {"layout": "2 gateways + 2 workers"}
        system.scale(2, 2)
        try:
            if plan.topology_ramp:
                system.start_simulator(plan.ramp_sim)
                self.warmup("tokenwire", plan.ramp_sim)
                best_one = one.get("max_streams") or plan.ramp_levels[0]
                levels = [lv for lv in plan.ramp_levels if lv >= best_one // 2] or plan.ramp_levels
                steps, best, _ = self._ramp("tokenwire", levels)
                two["max_streams"] = best
                two["ramp"] = steps
            system.start_simulator(plan.tput_sim)
            self.warmup("tokenwire", plan.tput_sim)
            tput = self._tput_run("tokenwire", two["layout"])
            two |= {k: tput.get(k) for k in ("frames_per_s", "tokens_per_s", "cpu_pct",
                                             "machine_busy_pct")}  # fmt: skip
        finally:
            system.scale(1, 1)
        self.results["topology"] = {"rows": [one, two]}

    # --- levers that need no code change -------------------------------------------------------

    def levers(self) -> None:
        plan, system = self.plan, self.system
        system.scale(1, 1)
        system.start_simulator(plan.tput_sim)
        default_gw = system.gateways[0]
        rows = []
        for name, args in plan.levers:
            gateway = default_gw if not args else None
            try:
                if gateway is None:
                    gateway = system.start_gateway(*args)
                self.warmup("tokenwire", plan.tput_sim, gateways=[gateway])
                tput = self._tput_run("tokenwire", name, gateways=[gateway])
                row: dict[str, Any] = {
                    "variant": name,
                    "args": " ".join(args) or "(tokenwire gateway)",
                    "frames_per_s": tput["frames_per_s"],
                    "complete": tput["complete"],
                    "streams": tput["streams"],
                }
                if args and args[:2] != ["--server", "granian"]:
                    # Granian serves from a child process: its RSS is not the launcher's.
                    idle = self._idle(name, gateway, plan.lever_idle)
                    row["idle_kib_per_conn"] = idle["per_conn_kib"]
                elif not args:
                    fresh = system.start_gateway()
                    idle = self._idle(name, fresh, plan.lever_idle)
                    system.stop(fresh)
                    row["idle_kib_per_conn"] = idle["per_conn_kib"]
                rows.append(row)
            except Exception as exc:  # a lever that cannot run is a finding, not a crash
                rows.append({"variant": name, "args": " ".join(args), "error": str(exc)[:300]})
            finally:
                if gateway is not None and gateway is not default_gw:
                    system.stop(gateway)
        # Token coalescing needs a worker change; its effect on the WebSocket side is what the
        # bare server shows when it packs several tokens into one delta.
        coalescing = []
        for per_frame in plan.coalescing:
            bare = system.start_bare(plan.tput_sim, "--tokens-per-frame", str(per_frame))
            try:
                self.warmup("bare", plan.tput_sim)
                tput = self._tput_run("bare", f"bare, {per_frame} token(s) per frame")
                coalescing.append(
                    {
                        "tokens_per_frame": per_frame,
                        "frames_per_s": tput["frames_per_s"],
                        "tokens_per_s": tput["tokens_per_s"] * per_frame,
                        "complete": tput["complete"],
                        "streams": tput["streams"],
                    }
                )
            finally:
                system.stop(bare)
        self.results["levers"] = {
            "rows": rows,
            "idle_connections": plan.lever_idle,
            "coalescing": coalescing,
        }

    def worker_levers(self) -> None:
        """Worker (and gateway) settings that need a code change, tried through the bench
        launchers on the first stream count where the shipped system broke the delay bound;
        then, in full mode, the whole ladder again with the best combination."""
        plan, system = self.plan, self.system
        ramp = self.results.get("ramp", {}).get("series", {}).get("tokenwire", [])
        failing = [s for s in ramp if not s["pass"]]
        level = failing[0]["streams"] if failing else plan.ramp_levels[-1]
        level = max(level, plan.worker_lever_min_streams)
        system.start_simulator(plan.ramp_sim)
        rows = []
        for name, worker_args, gateway_args in plan.worker_variants:
            self._relaunch(worker_args, gateway_args)
            try:
                self.warmup("tokenwire", plan.ramp_sim)
                step = self._ramp_step("tokenwire", level, None)
                rows.append({"variant": name, "worker": " ".join(worker_args),
                             "gateway": " ".join(gateway_args), **step})  # fmt: skip
            except Exception as exc:
                rows.append({"variant": name, "streams": level, "error": str(exc)[:300]})
        tuned: dict[str, Any] = {}
        if plan.tuned_ramp is not None:
            worker_args, gateway_args = plan.tuned_ramp
            self._relaunch(worker_args, gateway_args)
            self.warmup("tokenwire", plan.ramp_sim)
            start = self.results.get("ramp", {}).get("max", {}).get("tokenwire") or level
            levels = [lv for lv in plan.ramp_levels if lv >= start] or plan.ramp_levels
            steps, best, open_ended = self._ramp("tokenwire", levels)
            tuned = {
                "worker": " ".join(worker_args),
                "gateway": " ".join(gateway_args),
                "steps": steps,
                "max": best,
                "open_ended": open_ended,
            }
        self._relaunch([], [])
        self.results["worker_levers"] = {"streams": level, "rows": rows, "tuned": tuned}

    def _relaunch(self, worker_args: list[str], gateway_args: list[str]) -> None:
        """Exactly one worker and one gateway, as shipped or through the bench launchers."""
        system = self.system
        for proc in [*system.workers, *system.gateways]:
            system.stop(proc)
        system.start_worker(*worker_args)
        system.start_gateway(*gateway_args)

    # --- tokens at the upstream's speed (issue 13): worker as shipped against coalescing off -----

    def _relaunch_worker(self, env: dict[str, str]) -> None:
        system = self.system
        for proc in list(system.workers):
            system.stop(proc)
        system.start_worker(env=env)

    def _paced(self, kind: str, sim: SimSpec, connections: int, rounds: int, *,
               stagger: bool, label: str) -> dict[str, Any]:  # fmt: skip
        """One paced load; TTFT, gaps, tokens, frames and CPU µs per token of each process."""
        system = self.system
        answer = _answer_s(sim)
        pids: dict[str, int] = {"simulator": system.sim.pid} if system.sim else {}
        if kind == "tokenwire":
            pids |= {"gateway": system.gateways[0].pid, "worker": system.workers[0].pid}
            if system.nats is not None and system.nats.pid:
                pids["nats-server"] = system.nats.pid
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        t0 = time.monotonic()
        result = self.load(
            "upstream", kind, sim, connections, rounds=rounds,
            stagger_s=answer if stagger else 0.0,
            measure_from_s=answer if stagger and rounds > 1 else None,
            measure_to_s=answer * rounds if stagger and rounds > 1 else None,
            timeout_s=120 + rounds * answer * 4, label_suffix=label,
        )  # fmt: skip
        wall = time.monotonic() - t0
        used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        tokens = result.tokens
        return {
            "ttft": dist_ms(result.ttft_s),
            "gaps": dist_ms(result.gaps_s),
            "tokens": tokens,
            "frames": result.frames,
            "frames_per_token": result.frames / tokens if tokens else math.nan,
            "tokens_per_s": tokens / wall if wall else math.nan,
            "cpu_us_per_token": {n: 1e6 * c / tokens for n, c in used.items()} if tokens else {},
            "complete": result.complete,
            "streams": result.streams,
        }

    def upstream(self) -> None:
        """The figures of issue 13, the worker as shipped against coalescing off, same run:
        TTFT at 1 stream and in a burst of chats sent at the same instant, tokens/s against a
        direct SSE client, and a fast model (a token every 5 ms)."""
        plan, system = self.plan, self.system
        conns = plan.upstream_connections
        out: dict[str, Any] = {"connections": conns, "settings": [n for n, _ in
                               plan.worker_settings], "sse": {}, "rows": {}}  # fmt: skip
        rows: dict[str, dict[str, Any]] = {name: {} for name, _ in plan.worker_settings}

        def bursts(kind: str) -> dict[str, float]:
            ttfts: list[float] = []
            for _ in range(plan.upstream_bursts):
                res = self.load("upstream", kind, plan.upstream_ttft_sim, conns, rounds=1,
                                stagger_s=0.0, timeout_s=120, label_suffix="burst")  # fmt: skip
                ttfts += res.ttft_s
            return dist_ms(ttfts)

        def ttft(kind: str, row: dict[str, Any]) -> None:
            """Time to first token: one stream, and a burst of chats sent at one instant."""
            row["ttft1"] = self._paced(kind, plan.upstream_ttft_sim, 1, plan.upstream_ttft_rounds,
                                       stagger=False, label="1 stream")["ttft"]  # fmt: skip
            row["burst"] = bursts(kind)

        def tput(kind: str, row: dict[str, Any], name: str) -> None:
            """Unpaced answers on many connections: tokens/s at the clients, CPU per token."""
            row["tput"] = self._tput_once(kind, name, sim=plan.upstream_tput_sim,
                                          connections=conns, window_s=plan.upstream_window_s,
                                          section="upstream")  # fmt: skip

        def fast(kind: str, row: dict[str, Any]) -> None:
            """A fast model: a token every 5 ms, staggered back-to-back answers."""
            row["fast"] = self._paced(kind, plan.upstream_fast_sim, conns,
                                      plan.upstream_fast_rounds, stagger=True,
                                      label="fast model")  # fmt: skip

        stages = [(plan.upstream_ttft_sim, ttft), (plan.upstream_tput_sim, tput),
                  (plan.upstream_fast_sim, fast)]  # fmt: skip
        # One worker launch per setting; direct SSE once, beside the first.
        for i, (name, env) in enumerate(plan.worker_settings):
            self._relaunch_worker(env)
            for sim, measure in stages:
                system.start_simulator(sim)
                if i == 0:
                    self.warmup("sse", sim)
                    args: list[Any] = [out["sse"]] + (["direct SSE"] if measure is tput else [])
                    measure("sse", *args)
                self.warmup("tokenwire", sim)
                args = [rows[name]] + ([name] if measure is tput else [])
                measure("tokenwire", *args)
        self._relaunch_worker({})
        out["rows"] = rows
        out["sims"] = {"ttft": asdict(plan.upstream_ttft_sim),
                       "tput": asdict(plan.upstream_tput_sim),
                       "fast": asdict(plan.upstream_fast_sim)}  # fmt: skip
        self.results["upstream"] = out

    # --- driver --------------------------------------------------------------------------------

    def long_answers(self) -> None:
        """Time per token from 100 to 100,000 tokens (bench/long_answer.py)."""
        self.system.scale(1, 1)
        self.results["long_answers"] = long_answer.measure(
            self.system, self.plan.long_sizes, self.console, budget=self.plan.long_budget
        )

    def section(self, name: str, fn: Callable[[], None]) -> None:
        started = time.monotonic()
        load0 = Path("/proc/loadavg").read_text().split()[0]
        foreign = ForeignLoad()
        self.console.rule(f"[bold]{name}")
        try:
            fn()
        except Exception as exc:  # keep the other sections; the report names the failure
            self.console.print_exception()
            self.results.setdefault("failed_sections", {})[name] = f"{type(exc).__name__}: {exc}"
        self.results.setdefault("timing", {})[name] = {
            "seconds": time.monotonic() - started,
            "loadavg_before": float(load0),
            "loadavg_after": float(Path("/proc/loadavg").read_text().split()[0]),
            "foreign_cpu_pct": foreign.pct(),
        }
