"""Assertion helpers that speak the protocol's language."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.frames import Delta, Replace, Reset


def frame_types(frames: Sequence[Any]) -> list[str]:
    return [f.type if not isinstance(f, dict) else f["type"] for f in frames]


def assert_frames(frames: Sequence[Any], *types: str) -> None:
    assert frame_types(frames) == list(types), f"got {frame_types(frames)}, want {list(types)}"


def answer_of(frames: Sequence[Any]) -> str:
    """The answer a client shows: deltas appended, replace and reset applied."""
    text = ""
    for f in frames:
        kind = f["type"] if isinstance(f, dict) else f.type
        if kind == "delta":
            text += f["text"] if isinstance(f, dict) else f.text
        elif kind == "replace":
            text = f["text"] if isinstance(f, dict) else f.text
        elif kind == "reset":
            text = ""
    return text


def seqs_of(frames: Sequence[Any]) -> list[int]:
    return [f["seq"] if isinstance(f, dict) else f.seq for f in frames]


__all__ = ["Delta", "Replace", "Reset", "answer_of", "assert_frames", "frame_types", "seqs_of"]
