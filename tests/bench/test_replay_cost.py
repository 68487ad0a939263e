"""``python -m bench.replay_cost`` measures replay consumers on the product's own frame stream.

No cost is asserted (it depends on the machine). What a reader of the numbers in
docs/benchmarks.md relies on: the command runs against a real nats-server, every consumer got
every kept frame of its request (the run waits for exactly requests × history deliveries,
with either filter), and every row reports a real measurement for all three filter kinds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_replay_cost_quick_run_reports_every_filter(tmp_path: Path) -> None:
    out = tmp_path / "replay_cost.json"
    small = ["--requests", "30", "--history", "8", "--live-s", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.replay_cost", *small, "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = {row["filter"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"none", "literal", "any connection"}
    for kind, row in rows.items():
        assert (row["requests"], row["history"]) == (30, 8)
        assert row["live_frames_per_s"] > 0 and row["live_nats_core_pct"] >= 0
        if kind != "none":  # every consumer caught up with its 8 frames before this was written
            assert row["replay_s"] > 0 and row["replay_nats_cpu_s"] >= 0
