"""The benchmark tool works: its quick mode runs against real processes and writes a report.

Timings are never asserted here (they depend on the machine and on whoever else is using it);
what a user of the tool relies on is: the command succeeds, the report has every section and
its charts, every stream it drove delivered exactly the simulator's answer, and every number
it reports is a real, positive measurement.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

SECTIONS = (
    "## Targets",
    "## 1. Time to first token added",
    "## 2. Throughput end to end against the bare WebSocket ceiling",
    "## 3. Memory per idle connection",
    "## 4–5. Most concurrent streams within the delay bound",
    "## 6. One gateway + one worker against two + two",
    "## 7. Tokens at the upstream's speed: coalescing and the worker's path",
    "## 8. Long answers: time per token from 100 to 100,000 tokens",
    "## Levers",
    "## Every load of this run",
)
CHARTS = ("ttft.png", "throughput.png", "idle.png", "ramp.png", "levers.png")


def _positive(value: Any, what: str) -> None:
    assert isinstance(value, (int, float)), f"{what} is not a number: {value!r}"
    assert math.isfinite(value) and value > 0, f"{what} is not finite and positive: {value!r}"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench") / "benchmarks.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,  # a smoke run: generous on a loaded machine, never a timing assert
        check=False,
    )
    assert proc.returncode == 0, f"bench.run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = json.loads((out.parent / "bench" / "results.json").read_text())
    return out.read_text(), results, out.parent


@pytest.mark.timeout(570)
def test_quick_mode_writes_every_section_and_chart(
    quick_run: tuple[str, dict[str, Any], Path],
) -> None:
    report, _, out_dir = quick_run
    for heading in SECTIONS:
        assert heading in report, f"missing section {heading!r}"
    for chart in CHARTS:
        data = (out_dir / "bench" / chart).read_bytes()
        assert data.startswith(b"\x89PNG"), f"{chart} is not a PNG"
        assert f"bench/{chart}" in report, f"{chart} is not shown in the report"
    assert "quick mode" in report
    assert "| Python |" in report and "Versions: " in report  # the machine is named


@pytest.mark.timeout(570)
def test_every_stream_delivered_the_expected_answer(
    quick_run: tuple[str, dict[str, Any], Path],
) -> None:
    _, results, _ = quick_run
    runs = results["runs"]
    kinds = {r["kind"] for r in runs}
    assert {"tokenwire", "tutorial", "bare", "sse", "idle"} <= kinds
    for run in runs:
        label = f"{run['section']}/{run['kind']}×{run['connections']}"
        assert not run["timed_out"], f"{label} hit its time bound: {run['errors']}"
        assert run["wrong"] == 0 and run["failed"] == 0, f"{label}: {run['errors']}"
        assert run["complete"] == run["streams"], label
        if run["kind"] != "idle":
            assert run["streams"] >= run["connections"] > 0, label


@pytest.mark.timeout(570)
def test_reported_numbers_are_finite_and_positive(
    quick_run: tuple[str, dict[str, Any], Path],
) -> None:
    _, results, _ = quick_run
    for level in results["ttft"]["levels"]:
        for kind in ("sse", "tokenwire", "tutorial"):
            assert level[kind]["n"] > 0, f"no TTFT sample for {kind}"
            for q in ("p50", "p90", "p99"):
                _positive(level[kind][q], f"TTFT {q} of {kind} at {level['concurrency']}")
            assert math.isfinite(level.get(f"{kind}_added", {"p50": 0.0})["p50"])
    for row in results["throughput"]["rows"]:
        _positive(row["frames_per_s"], f"frames/s of {row['name']}")
        _positive(row["tokens_per_s"], f"tokens/s of {row['name']}")
    _positive(results["throughput"]["ratio_vs_bare"], "ratio to the bare server")
    for row in results["idle"]["rows"]:
        assert row["opened"] == row["connections"], row
        _positive(row["per_conn_kib"], f"KiB per idle connection of {row['server']}")
    for kind, steps in results["ramp"]["series"].items():
        assert steps, f"no ramp step for {kind}"
        for step in steps:
            _positive(step["gap_p50_ms"], f"gap p50 of {kind} at {step['streams']}")
            _positive(step["ttft_p99_ms"], f"TTFT p99 of {kind} at {step['streams']}")
    for row in results["topology"]["rows"]:
        _positive(row["frames_per_s"], f"frames/s of {row['layout']}")
    levers = results["levers"]["rows"]
    assert levers and all("error" not in r for r in levers), levers
    for row in levers:
        _positive(row["frames_per_s"], f"frames/s of lever {row['variant']}")
    intake = results["worker_levers"]["rows"]
    assert len(intake) == 2, intake
    for row in intake:
        assert "error" not in row, row
        _positive(row["gap_p50_ms"], f"gap p50 with {row['variant']}")
        assert row["complete"] == row["total"] > 0, row
    up = results["upstream"]
    assert len(up["settings"]) == 2, up["settings"]  # coalescing on and off, same run
    for name, row in [("direct SSE", up["sse"]), *up["rows"].items()]:
        for load in ("ttft1", "burst"):
            _positive(row[load]["p50"], f"{load} TTFT p50 of {name}")
        _positive(row["tput"]["tokens_per_s"], f"unpaced tokens/s of {name}")
        _positive(row["fast"]["tokens_per_s"], f"fast-model tokens/s of {name}")
    for row in up["rows"].values():
        for load in ("tput", "fast"):
            per = row[load]["cpu_us_per_token"]
            assert {"worker", "nats-server"} <= set(per) or {"worker1", "nats-server"} <= set(
                per
            ), per
            for process, us in per.items():  # a short quick load may not cost a jiffy
                assert math.isfinite(us) and us >= 0, f"CPU µs per token of {process}: {us}"
    long = results["long_answers"]
    assert [r["tokens"] for r in long["rows"]] == [100, 5_000], long
    for row in long["rows"]:
        assert row["ok"], f"the {row['tokens']}-token answer was wrong"
        _positive(row["us_per_token"], f"µs per token of a {row['tokens']}-token answer")
        for process, us in row["cpu_us_per_token"].items():
            assert math.isfinite(us) and us >= 0, f"CPU µs per token of {process}: {us}"
    assert "failed_sections" not in results, results.get("failed_sections")
