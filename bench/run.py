"""The one command: start everything, measure every section, write the report.

    .venv/bin/python -m bench.run [--quick] [--out docs/benchmarks.md] [--keep-workdir]
    .venv/bin/python -m bench.run --render docs/bench/results.json   # tables/charts only

Writes ``--out`` (markdown), its charts in ``<out dir>/bench/*.png`` and the raw results next
to them (``<out dir>/bench/results.json``). Exit status 0 when every section ran; the report
says which targets were met (no target is enforced here).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.loadgen import raise_nofile
from bench.report import machine_info, write_report
from bench.scenarios import Plan, Recorder
from bench.system import System

__all__ = ["main", "run"]


def machine_busy_pct(seconds: float = 2.0) -> float:
    """How busy the whole machine is (all cores, 100 = every core busy) over ``seconds``."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(values) - values[3] - values[4], sum(values)

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return 100 * (busy1 - busy0) / max(1, total1 - total0)


def run(plan: Plan, out: Path, workdir: Path, console: Console) -> dict[str, Any]:
    raise_nofile()  # inherited by every server and client process
    foreign_before = machine_busy_pct()
    started = time.monotonic()
    results: dict[str, Any] = {
        "mode": plan.mode,
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "plan": plan.as_dict(),
    }
    system = System(workdir)
    progress = Progress(
        TextColumn("[bold]{task.description:<44}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    rec = Recorder(system, plan, workdir, console=console, results=results, progress=progress)
    try:
        with progress:
            system.start_nats()
            system.start_simulator(plan.ttft_sim)
            system.start_worker()
            system.start_gateway()
            system.start_tutorial()
            system.start_bare(plan.tput_sim)
            rec.section("time to first token", rec.ttft)
            rec.section("concurrent streams within the delay bound", rec.ramp)
            rec.section("throughput", rec.throughput)
            rec.section("1+1 against 2+2", rec.topology)
            rec.section("tokens at the upstream's speed", rec.upstream)
            rec.section("levers", rec.levers)
            rec.section("worker job intake", rec.worker_levers)
            rec.section("long answers", rec.long_answers)
            rec.section("idle memory", rec.idle)
    except BaseException:
        console.print(system.logs())
        raise
    finally:
        system.close()
    results["runs"] = rec.runs
    results["duration_s"] = time.monotonic() - started
    results["foreign_busy_pct"] = {"before": foreign_before, "after": machine_busy_pct()}
    written = write_report(results, out)
    raw = out.parent / "bench" / "results.json"
    raw.write_text(json.dumps(results, indent=1, default=str, allow_nan=True))
    for path in [*written, raw]:
        console.print(f"wrote {path}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, under 2 minutes")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs and profiles")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="only re-render the report from a results.json of an earlier run",
    )
    args = parser.parse_args(argv)
    console = Console(stderr=False)
    if args.render is not None:
        results = json.loads(args.render.read_text())
        for path in write_report(results, args.out):
            console.print(f"wrote {path}")
        return 0
    plan = Plan.quick() if args.quick else Plan.full()
    workdir = Path(tempfile.mkdtemp(prefix="tokenwire-bench-"))
    try:
        results = run(plan, args.out, workdir, console)
    finally:
        if args.keep_workdir:
            console.print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    bad = [r for r in results["runs"] if r["wrong"] or r["failed"] or r["timed_out"]]
    if bad:
        console.print(f"[yellow]{len(bad)} load(s) lost or garbled streams; see the report")
    console.print(f"done in {results['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
