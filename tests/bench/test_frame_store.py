"""``python -m bench.frame_store --quick`` measures the frame stream at R1 and R3 for real.

No rate is asserted (it depends on the machine and on whoever else uses it). What a reader of
the report relies on is: every row is there, the stream measured is the project's own, and
the counts are true: every frame an acked or a paced load sent is in the stream (JetStream
counted it), and a flood of core publishes never shows more stored than sent.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.frame_store import SIZES, frame_stream_config

REPO = Path(__file__).resolve().parents[2]
LOADS = ("core flood", "acked flood", "core paced", "acked paced")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("frame-store") / "frame_store.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.frame_store", "--quick", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.timeout(260)
def test_every_load_of_both_replica_counts_is_reported(
    quick_run: tuple[str, dict[str, Any]],
) -> None:
    report, results = quick_run
    rows = results["rows"]
    found = sorted((r["replicas"], r["size"], r["load"]) for r in rows)
    wanted = sorted((n, size, load) for n in (1, 3) for size in SIZES.values() for load in LOADS)
    assert found == wanted
    for replicas, size, _ in wanted:
        assert f"| R{replicas} | {size} (" in report
    assert report.count(" | core flood | ") == 4 and report.count("| acked paced at ") == 4
    for row in rows:
        nodes = row["server_cpu_pct"]
        assert len(nodes) == row["replicas"], nodes  # R3: three servers measured
        assert row["leader"] in nodes, row["leader"]
        assert row["stored_per_s"] > 0 and row["stored_bytes_per_frame"] > row["size"], row


@pytest.mark.timeout(260)
def test_the_stream_measured_is_the_projects_own(quick_run: tuple[str, dict[str, Any]]) -> None:
    _, results = quick_run
    for replicas in (1, 3):
        config = results["stream"][str(replicas)]
        assert config == json.loads(json.dumps(frame_stream_config(replicas), default=str))
        assert config["num_replicas"] == replicas and config["storage"] == "file"


@pytest.mark.timeout(260)
def test_stored_equals_sent(quick_run: tuple[str, dict[str, Any]]) -> None:
    _, results = quick_run
    for row in results["rows"]:
        label = f"R{row['replicas']} {row['load']} {row['size']} B"
        assert row["sent"] > 0, label
        if row["load"] == "core flood":
            # Above the ceiling nats-server may drop core publishes (reported as lost);
            # it can never store more than was sent.
            assert 0 < row["stored"] <= row["sent"], label
            assert row["lost"] == row["sent"] - row["stored"], label
            continue
        assert row["stored"] == row["sent"], f"{label}: {row['lost']} frames lost"
        if row["acked"]:
            assert row["acks"] == row["sent"], label
            assert row["ack_errors"] == 0 and row["ack_missing"] == 0, label
            ack = row["ack_ms"]
            assert ack["n"] > 0 and math.isfinite(ack["p99"]) and ack["p99"] > 0, label
