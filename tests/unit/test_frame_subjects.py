"""Frame subjects that name their gateway and partition, and the partitioned frames store.

Properties over any key, gateway id, connection id and partition count: a frame subject is
heard by its own gateway's one subscription and no other's, kept by exactly one partition's
stream (the one every reader picks from the key alone), and parses back to its parts.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.settings import Settings
from shared.subjects import (
    FRAMES_STREAM,
    FrameAddress,
    frame_address,
    frame_partition,
    frames_stream,
    frames_stream_of,
    gateway_frames,
    new_gateway_id,
    partition_frames,
    partition_live,
    request_frames,
    request_frames_any_connection,
    request_key,
)
from shared.topology import frame_stream_configs, stream_configs

GATEWAYS = st.from_regex(r"[A-Za-z0-9_-]{1,24}", fullmatch=True)
CONNS = st.from_regex(r"[0-9a-f]{20}", fullmatch=True)
KEYS = st.builds(request_key, st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
PARTITIONS = st.integers(min_value=1, max_value=64)


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    p_tokens, s_tokens = pattern.split("."), subject.split(".")
    for i, token in enumerate(p_tokens):
        if token == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens) or (token != "*" and token != s_tokens[i]):
            return False
    return len(p_tokens) == len(s_tokens)


def live(subject: str) -> str:
    """Where its stream republishes ``subject`` (``tw.frames.X`` → ``tw.live.X``)."""
    return "tw.live." + subject.removeprefix("tw.frames.")


@given(KEYS, PARTITIONS)
def test_a_key_has_one_stable_partition_in_range(key: str, partitions: int) -> None:
    partition = frame_partition(key, partitions)
    assert 0 <= partition < partitions
    assert frame_partition(key, partitions) == partition
    assert frame_partition(key, 1) == 0


@given(GATEWAYS, CONNS, KEYS, PARTITIONS)
def test_a_frame_subject_parses_back_to_its_parts(
    gateway: str, conn: str, key: str, partitions: int
) -> None:
    subject = request_frames(gateway, conn, key, partitions=partitions)
    assert frame_address(subject) == FrameAddress(
        frame_partition(key, partitions), gateway, conn, key
    )


@given(GATEWAYS, GATEWAYS, CONNS, KEYS, PARTITIONS)
def test_only_its_own_gateway_hears_a_frame(
    gateway: str, other: str, conn: str, key: str, partitions: int
) -> None:
    published = request_frames(gateway, conn, key, partitions=partitions)
    subject = live(published)  # what the gateway hears: the stream's republish
    assert matches(gateway_frames(gateway), subject)
    assert matches(gateway_frames(other), subject) == (other == gateway)
    assert frame_address(subject) == frame_address(published)  # either form parses


@given(GATEWAYS, CONNS, KEYS, PARTITIONS)
def test_exactly_one_stream_keeps_a_frame_and_every_reader_finds_it(
    gateway: str, conn: str, key: str, partitions: int
) -> None:
    subject = request_frames(gateway, conn, key, partitions=partitions)
    keepers = [
        spec["name"]
        for spec in frame_stream_configs(Settings(frame_partitions=partitions))
        if any(matches(pattern, subject) for pattern in spec["subjects"])
    ]
    wanted = frames_stream(frame_partition(key, partitions))
    assert keepers == [wanted]
    assert frames_stream_of(subject) == wanted  # the worker: from the subject
    assert matches(request_frames_any_connection(key, partitions=partitions), subject)  # resume


@given(GATEWAYS, CONNS, KEYS, KEYS, PARTITIONS)
def test_resume_of_one_request_reads_no_other_request(
    gateway: str, conn: str, key: str, other: str, partitions: int
) -> None:
    subject = request_frames(gateway, conn, other, partitions=partitions)
    assert matches(request_frames_any_connection(key, partitions=partitions), subject) == (
        key == other
    )


def test_the_partition_of_a_key_never_changes_between_releases() -> None:
    """A different hash would move every request, as changing the partition count does."""
    key = request_key("alice", "r1")
    assert [frame_partition(key, n) for n in (1, 2, 3, 7, 64)] == [0, 1, 2, 2, 47]


def test_keys_spread_evenly_over_the_partitions() -> None:
    counts = Counter(frame_partition(request_key("u", f"r{i}"), 3) for i in range(3000))
    assert sorted(counts) == [0, 1, 2]
    assert all(850 <= n <= 1150 for n in counts.values()), counts


def test_a_subject_of_another_layout_is_not_a_frame_address() -> None:
    for subject in ("tw.frames.c.k", "tw.frames.x.g.c.k", "tw.jobs.chat", "tw.frames.0.g..k"):
        assert frame_address(subject) is None, subject
    assert frames_stream_of("tw.frames.c.k") == FRAMES_STREAM


def test_the_store_is_one_stream_per_partition_partition_0_first() -> None:
    settings = Settings(frame_partitions=3, frames_max_bytes=3 * 1024**3)
    frames = [s for s in stream_configs(settings) if s["name"].startswith(FRAMES_STREAM)]
    assert [s["name"] for s in frames] == ["TW_FRAMES", "TW_FRAMES_1", "TW_FRAMES_2"]
    assert [s["subjects"] for s in frames] == [[partition_frames(p)] for p in range(3)]
    # TOKENWIRE_FRAMES_MAX_BYTES is the whole store's, split evenly.
    assert [s["max_bytes"] for s in frames] == [1024**3] * 3
    # Each republishes what it stored on its own live subjects, the gateways' live path.
    assert [s["republish"] for s in frames] == [
        {"src": partition_frames(p), "dest": partition_live(p)} for p in range(3)
    ]
    own = ("name", "subjects", "republish")
    same = {k: v for k, v in frames[0].items() if k not in own}
    assert all({k: v for k, v in s.items() if k not in own} == same for s in frames)
    one = [s for s in stream_configs(Settings()) if s["name"].startswith(FRAMES_STREAM)]
    assert [(s["name"], s["subjects"]) for s in one] == [("TW_FRAMES", ["tw.frames.0.>"])]


def test_a_fresh_gateway_id_is_one_subject_token_and_new_each_time() -> None:
    ids = {new_gateway_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids)


def test_gateway_id_setting_is_one_subject_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENWIRE_GATEWAY_ID", "tokenwire-gateway-7d9f8b-x2k_1")
    assert Settings().gateway_id == "tokenwire-gateway-7d9f8b-x2k_1"
    for bad in ("", "a.b", "gw*", "gw>", "a b", "pod/1", "x" * 129):
        monkeypatch.setenv("TOKENWIRE_GATEWAY_ID", bad)
        with pytest.raises(ValidationError, match="TOKENWIRE_GATEWAY_ID"):
            Settings()


def test_partition_count_and_split_limits_are_checked() -> None:
    assert Settings().frame_partitions == 1
    for bad in (0, 65):
        with pytest.raises(ValidationError):
            Settings(frame_partitions=bad)
    with pytest.raises(ValidationError, match="at least 1024 bytes"):
        Settings(frame_partitions=4, frames_max_bytes=4000)
