"""The generation rule (shared/sequencing.py ``Generations``), as every reader applies it.

A stale delivery (gen 0) and the one that fenced it out (gen G) publish into one request's
stream in any interleaving after the fence; the gateway's live path, a ``resume`` replay, a
live path that misses a message and reads the rest back, and the next delivery's reading of
the kept frames (``Kept.of``) must all end with the same exact answer and gapless seqs.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.delivery import Kept
from shared.frames import Delta, End, Fence, Reset, Start, encode, with_gen
from shared.sequencing import Generations, Reorderer, Verdict
from shared.session import Session, SessionConfig, StartReplay, StreamPosition
from tests.unit.test_session import USER, chat, client, encode_accepted, one, opened, sent

RID = "r1"


def test_the_rule_in_stream_order() -> None:
    g = Generations()
    assert g.offer("delta", 0, 2) is Verdict.COUNTS
    assert g.offer("delta", 7, 3) is Verdict.EARLY  # its fence not seen yet
    assert g.offer("fence", 7, 2) is Verdict.FENCE and (g.gen, g.after) == (7, 2)
    assert g.offer("delta", 0, 3) is Verdict.STALE
    assert g.offer("delta", 7, 3) is Verdict.COUNTS
    assert g.offer("fence", 5, 3) is Verdict.STALE  # a superseded delivery's fence
    assert g.offer("accepted", 0, 1) is Verdict.COUNTS  # the gateway's, whatever the gen


def test_a_fence_discards_what_waits_past_it() -> None:
    r: Reorderer[str] = Reorderer(2)
    assert r.push(4, "d") == [] and r.push(3, "c") == []
    assert r.discard_above(2) == 2
    assert r.push(3, "C") == [] and r.push(2, "b") == ["b", "C"]


def test_with_gen_stamps_the_wire_bytes() -> None:
    data = with_gen(encode(Delta(id=RID, seq=3, text="x")), 9)
    assert orjson.loads(data) == {"id": RID, "seq": 3, "text": "x", "type": "delta", "gen": 9}


# --- two generations in one stream --------------------------------------------------------


def _answer(gen: int, first: int, texts: list[str], *, reset: bool) -> list[bytes]:
    seq = itertools.count(first)
    frames: list[Any] = [Reset(id=RID, seq=next(seq), reason="retry")] if reset else []
    frames.append(Start(id=RID, seq=next(seq), conversation_id="c", message_id="m", task_id="t"))
    frames += [Delta(id=RID, seq=next(seq), text=t) for t in texts]
    frames.append(End(id=RID, seq=next(seq), conversation_id="c", message_id="m"))
    return [with_gen(encode(f), gen) if gen else encode(f) for f in frames]


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[bytes], str]:
    """A request's stream: gen 0's first frames, a fence of gen G right after them, then gen
    0's late frames interleaved with gen G's answer (and some kept twice)."""
    old = _answer(0, 2, [f"old{i} " for i in range(draw(st.integers(3, 8)))], reset=False)
    held = draw(st.integers(0, len(old) - 1))  # gen 0's frames stored before the fence
    gen = draw(st.integers(1, 10**6))
    texts = [f"new{i} " for i in range(draw(st.integers(1, 6)))]
    new = _answer(gen, held + 2, texts, reset=held > 0)
    late, mine = list(old[held:]), list(new)
    merged: list[bytes] = []
    while late or mine:
        source = late if late and (not mine or draw(st.booleans())) else mine
        merged.append(source.pop(0))
    twice = draw(st.lists(st.sampled_from(merged), max_size=3))  # republished by ensure_kept
    fence = encode(Fence(id=RID, gen=gen, after=held + 1))
    stream = [encode_accepted(RID), *old[:held], fence, *merged, *twice]
    return stream, "".join(texts)


def _live(stream: list[bytes], missed: int | None = None) -> list[dict[str, Any]]:
    """The owning gateway: the stream's republish, one message possibly lost on the way; a
    read-back from the stream when the chain of stream sequences breaks."""
    session = opened()
    out = sent(chat(session, RID))
    replay: StartReplay | None = None
    for i, data in enumerate(stream, start=1):
        if i == missed:
            continue
        commands = session.receive_bus(data, 0.0, StreamPosition(i, i - 1))
        out += sent(commands)
        started = [c for c in commands if isinstance(c, StartReplay)]
        if started:
            replay = started[0]
            break
    if replay is not None:
        session.replay_started(replay.serial)
        for i, data in enumerate(stream, start=1):
            out += sent(session.receive_bus(data, 0.0, StreamPosition(i)))
    return out


def _resumed(stream: list[bytes], after: int = 0) -> list[dict[str, Any]]:
    """Another connection's ``resume`` from ``after``: an ordered consumer over the stream."""
    session = Session(
        SessionConfig(frame_rate="1000/s"), conn_id="other", user=USER, now=0.0, expires_at=None
    )
    session.start()
    session.subscribed()
    session.receive_client(client({"type": "resume", "id": RID, "after": after}), 0.0)
    replay = one(session.looked_up(RID, found=True), StartReplay)
    session.replay_started(replay.serial)
    out: list[dict[str, Any]] = []
    for i, data in enumerate(stream, start=1):
        out += sent(session.receive_bus(data, 0.0, StreamPosition(i)))
    return out


def _text(frames: list[dict[str, Any]]) -> str:
    text = ""
    for f in frames:
        if f["type"] == "delta":
            text += f["text"]
        elif f["type"] == "reset":
            text = ""
    return text


def _plain(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in f.items() if k != "gen"} for f in frames]


@settings(max_examples=150, deadline=None)
@given(streams(), st.data())
def test_every_reader_ends_with_the_newer_generations_exact_answer(
    case: tuple[list[bytes], str], data: st.DataObject
) -> None:
    stream, answer = case
    live = _live(stream)
    seqs = [f["seq"] for f in live]
    assert seqs == list(range(1, len(live) + 1)), seqs
    assert live[-1]["type"] == "end" and _text(live) == answer
    assert _plain(_resumed(stream)) == _plain(live)
    held = data.draw(st.integers(1, len(live) - 1), label="held")  # a client back mid-answer
    assert _plain(_resumed(stream, held)) == _plain(live[held:])
    # A lost message shows when the next one arrives (the last one: only by its absence).
    missed = data.draw(st.integers(2, len(stream) - 1), label="missed")
    assert _plain(_live(stream, missed)) == _plain(live)
    kept = Kept.of(orjson.loads(d) for d in stream)
    assert kept.closed and kept.answer == answer and kept.last_seq == seqs[-1]


def test_kept_continues_after_the_run_without_a_gap() -> None:
    frames = [encode_accepted(RID), *_answer(0, 2, ["a", "b", "c"], reset=False)]
    del frames[3]  # seq 4 never reached the stream (a leader change): 5, 6 were never sent
    kept = Kept.of(orjson.loads(d) for d in frames)
    assert (kept.last_seq, kept.answer) == (3, "a")


def test_a_fence_behind_what_a_client_was_sent_fails_the_request_not_a_seq_twice() -> None:
    session = opened()
    chat(session, RID)
    old = _answer(0, 2, ["a", "b"], reset=False)
    for data in old[:3]:
        session.receive_bus(data, 0.0)  # seqs 2-4 sent (no stream positions: taken as they come)
    out = session.receive_bus(encode(Fence(id=RID, gen=3, after=2)), 0.0)
    (error,) = sent(out)
    assert error["type"] == "error" and error["seq"] == 5 and session.inflight == 0
