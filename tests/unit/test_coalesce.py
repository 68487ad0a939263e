"""The coalescing rule: when a request's frames leave, and that merging them loses nothing.

Unit tests name each clause of the rule (``shared/coalesce.py``); the property tests drive it
with random token timings, random reads and a random deadline timer, then cut the output at a
random point as a ``resume`` would, and check the answer and the ``seq`` exactly.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.coalesce import Coalescer
from shared.frames import Delta, End, Event, Replace, ServerFrame, Start
from tests.unit.helpers import answer_of, assert_frames, seqs_of

MS = 0.001


def d(text: str, seq: int = 0) -> Delta:
    return Delta(id="r1", seq=seq, text=text)


START = Start(id="r1", seq=0, conversation_id="c", message_id="m", task_id="t")
END = End(
    id="r1",
    seq=0,
    conversation_id="c",
    message_id="m",
    usage=None,
    retriever_resources=[],
    stopped=False,
)


def texts(frames: list[ServerFrame]) -> list[str]:
    return [f.text for f in frames if isinstance(f, Delta)]


def test_the_first_token_goes_out_at_once() -> None:
    c = Coalescer(1, interval_s=16 * MS)
    out = c.feed([START, d("Hel")], now=0.0)
    assert_frames(out, "start", "delta")
    assert seqs_of(out) == [2, 3] and c.deadline is None


def test_text_that_arrives_while_a_frame_waits_is_appended_and_leaves_at_the_deadline() -> None:
    c = Coalescer(1, interval_s=16 * MS)
    c.feed([START, d("a")], now=0.0)
    assert c.feed([d("b")], now=2 * MS) == []
    assert c.feed([d("c")], now=5 * MS) == []
    assert c.deadline == 16 * MS
    assert c.due(10 * MS) == []  # a timer that fires early releases nothing
    (out,) = c.due(16 * MS)
    assert out == Delta(id="r1", seq=4, text="bc")
    assert c.deadline is None


def test_at_most_one_delta_per_interval() -> None:
    c = Coalescer(1, interval_s=16 * MS)
    sent: list[tuple[float, ServerFrame]] = []
    now = 0.0
    for i in range(200):  # a token every millisecond
        now = i * MS
        sent += [(now, f) for f in c.due(now)]
        sent += [(now, f) for f in c.feed([d("x")], now)]
    times = [t for t, f in sent if isinstance(f, Delta)]
    assert all(b - a >= 16 * MS - 1e-9 for a, b in itertools.pairwise(times))
    assert len(times) <= 200 / 16 + 1


def test_a_token_after_a_quiet_interval_goes_at_once() -> None:
    c = Coalescer(1, interval_s=16 * MS)
    c.feed([START, d("a")], now=0.0)
    out = c.feed([d("b")], now=40 * MS)  # a paced model: every token on its own
    assert seqs_of(out) == [4] and texts(out) == ["b"]


def test_one_read_goes_out_as_one_delta() -> None:
    c = Coalescer(1, interval_s=16 * MS)
    out = c.feed([START, d("a"), d("b"), d("c")], now=0.0)
    assert_frames(out, "start", "delta")
    assert texts(out) == ["abc"] and seqs_of(out) == [2, 3]


def test_the_size_bound_flushes_before_the_deadline() -> None:
    c = Coalescer(1, interval_s=16 * MS, max_chars=10)
    c.feed([START, d("a")], now=0.0)
    assert c.feed([d("12345")], now=1 * MS) == []
    out = c.feed([d("67890")], now=2 * MS)  # 10 characters wait: they go now
    assert texts(out) == ["1234567890"]
    out = c.feed([d("abcdefgh"), d("ijklmn")], now=3 * MS)  # would pass the bound: split
    assert texts(out) == ["abcdefgh"]
    assert c.waiting


def test_any_other_frame_flushes_what_waits_first_and_keeps_its_order() -> None:
    for other in (
        Replace(id="r1", seq=0, text="new"),
        Event(id="r1", seq=0, event="agent_thought", data={}),
        END,
    ):
        c = Coalescer(1, interval_s=16 * MS)
        c.feed([START, d("a")], now=0.0)
        c.feed([d("b")], now=1 * MS)
        out = c.feed([d("c"), other, d("d")], now=2 * MS)
        assert [f.type for f in out] == ["delta", other.type] and texts(out) == ["bc"]
        assert seqs_of(out) == [4, 5]
        rest = c.flush(3 * MS)
        assert texts(rest) == ["d"] and seqs_of(rest) == [6]


def test_zero_turns_it_off_one_frame_per_token() -> None:
    c = Coalescer(1, interval_s=0)
    out = c.feed([START, d("a"), d("b")], now=0.0)
    out += c.feed([d("c")], now=0.0001)
    assert_frames(out, "start", "delta", "delta", "delta")
    assert seqs_of(out) == [2, 3, 4, 5] and c.deadline is None


def test_seq_continues_after_the_kept_frames() -> None:
    c = Coalescer(7, interval_s=16 * MS)
    out = c.feed([d("x", seq=99)], now=0.0)
    assert seqs_of(out) == [8]


# --- properties: random timings, random reads, random resume points ----------------------

# One step of a stream: a read of some tokens after a gap (ms), or an event frame.
steps = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=40),
        st.lists(st.text(min_size=1, max_size=4), min_size=0, max_size=6),
        st.sampled_from(["none", "none", "none", "event", "replace"]),
    ),
    min_size=1,
    max_size=60,
)


def drive(
    plan: list[tuple[float, list[str], str]], interval_ms: float, max_chars: int
) -> tuple[list[dict[str, Any]], list[tuple[float, str]], str]:
    """Runs the rule as the worker's shell does (the timer fires at each deadline); returns
    what was sent (decoded, as a client gets it), when each delta left, and the answer."""
    c = Coalescer(1, interval_s=interval_ms * MS, max_chars=max_chars)
    sent: list[ServerFrame] = []
    times: list[tuple[float, str]] = []
    now = 0.0
    answer = ""

    def take(frames: list[ServerFrame]) -> None:
        for f in frames:
            sent.append(f)
            if isinstance(f, Delta):
                times.append((now, f.text))

    take(c.feed([START], now))
    for gap_ms, tokens, other in plan:
        target = now + gap_ms * MS
        while c.deadline is not None and c.deadline <= target:
            now = c.deadline
            take(c.due(now))
        now = target
        frames: list[ServerFrame] = [d(t) for t in tokens]
        answer += "".join(tokens)
        if other == "event":
            frames.append(Event(id="r1", seq=0, event="node_started", data={}))
        elif other == "replace":
            frames.append(Replace(id="r1", seq=0, text="R"))
            answer = "R"
        take(c.feed(frames, now))
    take(c.feed([END], now))
    decoded = [orjson.loads(orjson.dumps(f)) for f in sent]
    return decoded, times, answer


@settings(max_examples=300, deadline=None)
@given(
    plan=steps,
    interval_ms=st.sampled_from([0, 5, 16, 50]),
    max_chars=st.integers(min_value=1, max_value=64),
)
def test_coalesced_frames_carry_the_same_answer_with_gapless_seq(
    plan: list[tuple[float, list[str], str]], interval_ms: float, max_chars: int
) -> None:
    frames, _, answer = drive(plan, interval_ms, max_chars)
    assert seqs_of(frames) == list(range(2, 2 + len(frames)))
    assert frames[0]["type"] == "start" and frames[-1]["type"] == "end"
    assert answer_of(frames) == answer


@settings(max_examples=300, deadline=None)
@given(plan=steps, interval_ms=st.sampled_from([5, 16, 50]))
def test_text_leaves_at_most_once_per_interval(
    plan: list[tuple[float, list[str], str]], interval_ms: float
) -> None:
    """Two deltas in a row are at least one interval apart, unless the second was flushed
    early by the frame that follows it (an event, a replace, the end: order is kept)."""
    frames, times, _ = drive(plan, interval_ms, 4096)
    kinds = [f["type"] for f in frames]
    delta_at = iter(times)
    when: list[float | None] = [next(delta_at)[0] if k == "delta" else None for k in kinds]
    for i in range(len(when) - 2):
        a, b = when[i], when[i + 1]
        if a is not None and b is not None and kinds[i + 2] == "delta":
            assert b - a >= interval_ms * MS - 1e-9


@settings(max_examples=300, deadline=None)
@given(plan=steps, interval_ms=st.sampled_from([5, 16]), cut=st.floats(0, 1))
def test_a_resume_anywhere_in_a_coalesced_run_loses_and_repeats_nothing(
    plan: list[tuple[float, list[str], str]], interval_ms: float, cut: float
) -> None:
    """A client holding frames up to seq n resumes with ``after: n`` and gets every later
    frame from the frames stream: what it then holds is exactly the answer, once."""
    frames, _, answer = drive(plan, interval_ms, 4096)
    held_upto = 1 + int(cut * len(frames))  # the last seq the client holds (1: accepted)
    held = [f for f in frames if f["seq"] <= held_upto]
    replayed = [f for f in frames if f["seq"] > held_upto]
    together = held + replayed
    assert seqs_of(together) == list(range(2, 2 + len(frames)))
    assert answer_of(together) == answer


@settings(max_examples=200, deadline=None)
@given(plan=steps)
def test_off_and_on_give_the_same_answer(plan: list[tuple[float, list[str], str]]) -> None:
    off, _, answer = drive(plan, 0, 4096)
    on, _, same = drive(plan, 16, 4096)
    assert answer == same and answer_of(off) == answer_of(on) == answer
    assert len(on) <= len(off)
