"""Percentiles, per-process CPU and py-spy profiles for the benchmark report."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = [
    "ForeignLoad",
    "Profiler",
    "cpu_seconds",
    "dist_ms",
    "percentile",
    "summarize_profile",
]

_TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between the two nearest ranks; NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def dist_ms(values_s: list[float]) -> dict[str, float]:
    """n, p50, p90, p99 and max of durations given in seconds, in milliseconds."""
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "max": max(ms) if ms else math.nan,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (and its reaped children) so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command: state(0) ... utime(11) stime(12) cutime(13) cstime(14).
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / _TICKS


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by ``root`` and every living descendant (reaped ones are in
    their parents' cutime/cstime)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    total = 0.0
    for pid in tree:
        try:
            total += cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            continue
    return total


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


class ForeignLoad:
    """How much of the machine other people's work used between two samples (percent of all
    cores): the machine's busy time minus this benchmark's whole process tree."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        busy, total = machine_jiffies()
        return busy / _TICKS, total / _TICKS, tree_cpu_seconds(os.getpid())

    def pct(self) -> float:
        busy0, total0, ours0 = self.start
        busy1, total1, ours1 = self._sample()
        if total1 <= total0:
            return 0.0
        return max(0.0, 100 * ((busy1 - busy0) - (ours1 - ours0)) / (total1 - total0))


class Profiler:
    """``py-spy record`` on some processes for a while (raw collapsed stacks, by function)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).parent / "py-spy"
        self.exe = str(exe) if exe.exists() else shutil.which("py-spy")
        self.running: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    @property
    def available(self) -> bool:
        return self.exe is not None

    def start(self, name: str, pid: int, seconds: float, rate: int = 97) -> None:
        if self.exe is None:
            return
        out = self.workdir / f"profile-{name}.txt"
        argv = [self.exe, "record", "-p", str(pid), "-d", str(max(1, round(seconds))),
                "-r", str(rate), "-f", "raw", "-F", "--nonblocking", "-o", str(out)]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.running.append((name, proc, out))

    def finish(self) -> dict[str, Path]:
        done: dict[str, Path] = {}
        for name, proc, out in self.running:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if out.exists():
                done[name] = out
        self.running.clear()
        return done


def _frame_name(frame: str) -> str:
    """``func (path:line)`` → ``func (short/path.py)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


def summarize_profile(path: Path, *, top: int = 12, own: tuple[str, ...] = ()) -> dict[str, Any]:
    """Self time by function, and total (inclusive) time of the project's own functions.

    ``own`` names the path prefixes counted as the project's (``gateway/``, ``worker/``…).
    Shares are of all samples taken while the process was busy.
    """
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame_name(f) for f in stack.split(";")]
        self_time[frames[-1]] += count
        for name in set(frames):
            if any(f"({prefix}" in name for prefix in own):
                inclusive[name] += count
    share = (lambda n: 100 * n / total) if total else (lambda n: 0.0)
    return {
        "samples": total,
        "self": [(name, share(n)) for name, n in self_time.most_common(top)],
        "own_inclusive": [(name, share(n)) for name, n in inclusive.most_common(top)],
    }
