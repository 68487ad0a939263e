"""The Python client's answer folding against the frame sequences both clients share.

tests/fixtures/answers.json is also what web/test/folding.test.mjs feeds the browser SDK, so
the two clients cannot fold the same frames into different answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from tokenwire.client import ChatStream, Connection

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "answers.json"
CASES: list[dict[str, Any]] = json.loads(FIXTURE.read_text(encoding="utf-8"))["cases"]


def fold(frames: list[dict[str, Any]]) -> ChatStream:
    """Feed ``frames`` of request ``r`` through the connection's receive path."""
    conn = Connection("ws://127.0.0.1:9/v1/ws")
    stream = ChatStream(connection=conn, id="r", query="q")
    conn.requests[stream.id] = stream
    for frame in frames:
        conn._handle(orjson.dumps({**frame, "id": "r"}))
    return stream


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_folding_matches_the_shared_fixture(case: dict[str, Any]) -> None:
    stream = fold(case["frames"])
    expected = case["expected"]
    seen = {
        "text": stream.text,
        "status": stream.status.value,
        "error": stream.error.code if stream.error else None,
        "last_seq": stream.last_seq,
        "seqs": [f.seq for f in stream.frames],
        "events": len(stream.events),
        "conversation_id": stream.conversation_id,
    }
    assert {k: seen[k] for k in expected} == expected


def test_the_fixture_covers_every_request_frame_kind() -> None:
    kinds = {f["type"] for case in CASES for f in case["frames"]}
    assert kinds == {
        "accepted",
        "queued",
        "start",
        "delta",
        "replace",
        "event",
        "reset",
        "end",
        "error",
    }
