"""The connection's sans-I/O session, driven with no socket, no NATS and no event loop.

Every test feeds inputs (client frames, bus frames, I/O results, clock readings) and looks at
the commands that come back, as ``websockets``' tests drive its ``Protocol``.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared.exceptions import (
    CloseCode,
    ErrorCode,
    InternalError,
    RateLimited,
    TokenExpired,
    TokenwireError,
    TooBusy,
    Unauthorized,
)
from shared.frames import ClientLimits, Delta, End, Start, encode
from shared.session import (
    CONNECTION_TRANSITIONS,
    GAP_WAIT_S,
    CheckRate,
    Close,
    Command,
    ConnectionEvent,
    ConnectionState,
    IllegalConnectionTransition,
    Log,
    LookUp,
    Metric,
    PublishFrame,
    RequestStop,
    Send,
    Session,
    SessionConfig,
    SessionError,
    StartReplay,
    StopReplay,
    StoreJob,
    SubscribeConnection,
    Tally,
    Unsubscribe,
    VerifyToken,
    peek_request_id,
)
from shared.subjects import frame_partition, request_frames, request_key
from tests.unit.helpers import answer_of

USER = "ada"
CONN = "c0nn"
S = ConnectionState
E = ConnectionEvent
BUS_DOWN = InternalError("cannot replay: NATS is unavailable", code=ErrorCode.BUS_UNAVAILABLE)


# --- helpers that speak the session's language --------------------------------------------


def config(**kw: Any) -> SessionConfig:
    return SessionConfig(**{"frame_rate": "1000/s", "frame_burst": 1000, **kw})


def opened(now: float = 0.0, expires_at: float | None = None, **kw: Any) -> Session:
    """A session whose subscription is in place and whose hello went out."""
    ids = (f"trace{n}" for n in itertools.count())
    session = Session(
        config(**kw),
        conn_id=CONN,
        user=USER,
        expires_at=expires_at,
        now=now,
        new_trace_id=lambda: next(ids),
    )
    assert session.start() == [SubscribeConnection(CONN)]
    session.subscribed()
    return session


def of(commands: list[Command], kind: type[Any]) -> list[Any]:
    return [c for c in commands if isinstance(c, kind)]


def one(commands: list[Command], kind: type[Any]) -> Any:
    (found,) = of(commands, kind)
    return found


def sent(commands: list[Command]) -> list[dict[str, Any]]:
    """The frames the client receives, decoded."""
    return [orjson.loads(c.data) for c in of(commands, Send)]


def tallies(commands: list[Command]) -> list[tuple[str, str]]:
    return [(t.metric.value, t.label) for t in of(commands, Tally)]


def client(obj: dict[str, Any] | str) -> str:
    return obj if isinstance(obj, str) else orjson.dumps(obj).decode()


def answer_frames(rid: str, texts: list[str], *, first: int = 2) -> list[bytes]:
    """What a worker publishes for request ``rid``: start, deltas, end (``accepted`` is 1)."""
    seq = itertools.count(first)
    frames = [
        encode(Start(id=rid, seq=next(seq), conversation_id="c", message_id="m", task_id="t"))
    ]
    frames += [encode(Delta(id=rid, seq=next(seq), text=t)) for t in texts]
    frames.append(encode(End(id=rid, seq=next(seq), conversation_id="c", message_id="m")))
    return frames


def chat(session: Session, rid: str, now: float = 0.0, *, duplicate: bool = False) -> list[Command]:
    """A chat that passes the rate check and is stored: the commands of the last step."""
    out = session.receive_client(client({"type": "chat", "id": rid, "query": "hi"}), now)
    assert one(out, CheckRate) == CheckRate(rid)
    job = one(session.rate_checked(rid, now), StoreJob).job
    assert (job.id, job.user, job.conn, job.key) == (rid, USER, CONN, request_key(USER, rid))
    return session.job_stored(rid, now, duplicate=duplicate)


def feed_bus(session: Session, frames: list[bytes], now: float = 0.0) -> list[Command]:
    out: list[Command] = []
    for data in frames:
        out += session.receive_bus(data, now)
    return out


def assert_closes(commands: list[Command], code: CloseCode, error: str | None) -> None:
    assert one(commands, Close).code == code
    assert commands[-1] == one(commands, Close), "nothing follows the close"
    if error is not None:
        assert [f["code"] for f in sent(commands)] == [error]


# --- the connection's state table -----------------------------------------------------------

# The table written out by hand (not read from CONNECTION_TRANSITIONS).
LEGAL = {
    (S.OPEN, E.CLOSE): S.DRAINING,
    (S.OPEN, E.ABANDON): S.CLOSING,
    (S.OPEN, E.CLIENT_LEFT): S.CLOSED,
    (S.DRAINING, E.FLUSHED): S.CLOSING,
    (S.DRAINING, E.ABANDON): S.CLOSING,
    (S.DRAINING, E.CLIENT_LEFT): S.CLOSED,
    (S.CLOSING, E.CLOSE_SENT): S.CLOSED,
    (S.CLOSING, E.CLIENT_LEFT): S.CLOSED,
}
PAIRS = [(state, event) for state in ConnectionState for event in ConnectionEvent]


def test_the_table_is_the_one_written_here() -> None:
    table = {(s, e): t for s, moves in CONNECTION_TRANSITIONS.items() for e, t in moves.items()}
    assert table == LEGAL


def reach(state: ConnectionState) -> Session:
    """A session in ``state``, reached through the public inputs only."""
    session = opened()
    if state is S.DRAINING:
        session.close(CloseCode.DRAINING)
    elif state is S.CLOSING:
        session.send_overflowed()
    elif state is S.CLOSED:
        session.client_left(1000)
    assert session.state is state
    return session


def take(session: Session, event: ConnectionEvent) -> list[Command]:
    """Feed the public input that raises ``event``."""
    if event is E.CLOSE:
        return session.close(CloseCode.DRAINING)
    if event is E.ABANDON:
        return session.send_overflowed()
    if event is E.FLUSHED:
        return session.flushed()
    if event is E.CLOSE_SENT:
        return session.closed()
    return session.client_left(1001)


@pytest.mark.parametrize(("state", "event"), PAIRS, ids=[f"{s.value}-{e.value}" for s, e in PAIRS])
def test_every_transition_of_the_connection(state: ConnectionState, event: ConnectionEvent) -> None:
    session = reach(state)
    if (state, event) in LEGAL:
        take(session, event)
        assert session.state is LEGAL[state, event]
    elif event in (E.CLOSE, E.ABANDON):
        # Asking to close what already closes is no event: the first close wins.
        assert take(session, event) == []
        assert session.state is state
    else:
        with pytest.raises(IllegalConnectionTransition) as raised:
            take(session, event)
        assert isinstance(raised.value, InternalError) and session.state is state


def test_a_close_lets_the_queue_out_then_counts_the_close() -> None:
    session = opened()
    out = session.close(CloseCode.DRAINING)
    assert out == [Unsubscribe(), Close(CloseCode.DRAINING, flush=True)]
    assert session.flushed() == []
    assert tallies(session.closed()) == [("closed", "4100")]


def test_the_first_close_wins_and_nothing_is_sent_after_it() -> None:
    session = opened()
    chat(session, "r1")
    assert_closes(session.send_overflowed(), CloseCode.SLOW_CONSUMER, None)
    assert session.close(CloseCode.DRAINING) == []
    assert session.close_code is CloseCode.SLOW_CONSUMER
    # Everything that still arrives is ignored: no frame is sent on a closing connection.
    assert session.receive_client(client({"type": "ping"}), 1.0) == []
    assert feed_bus(session, answer_frames("r1", ["late"])) == []
    assert session.tick(10_000.0) == []
    # The request in flight is still answered by its worker: resumable elsewhere.
    assert tallies(session.closed()) == [("finished", "detached"), ("closed", "4101")]


def test_hello_first_and_a_failed_subscription_closes_with_4102() -> None:
    session = Session(config(), conn_id=CONN, user=USER, expires_at=None, now=0.0)
    session.start()
    hello = session.subscribed()
    assert tallies(hello) == [("opened", "")]
    (frame,) = sent(hello)
    assert frame["type"] == "hello" and frame["user"] == USER and frame["session"] == CONN
    assert frame["limits"]["max_frame_bytes"] == 64 * 1024
    with pytest.raises(SessionError):
        session.subscribed()

    refused = Session(config(), conn_id=CONN, user=USER, expires_at=None, now=0.0)
    out = refused.subscribe_failed(BUS_DOWN)
    assert_closes(out, CloseCode.BUS_UNAVAILABLE, "bus_unavailable")
    refused.flushed()
    assert refused.closed() == [], "a connection that never opened is not counted"


def test_the_client_leaving_detaches_everything() -> None:
    session = opened()
    session.receive_client(client({"type": "resume", "id": "r1", "after": 0}), 0.0)
    replay = one(session.looked_up("r1", found=True), StartReplay)
    out = session.client_left(1001)
    assert session.state is S.CLOSED
    assert of(out, StopReplay) == [StopReplay(replay.serial)] and of(out, Unsubscribe)
    assert tallies(out) == [("finished", "detached"), ("closed", "1001")]


# --- chat intake ------------------------------------------------------------------------


def test_a_chat_is_stored_then_accepted_and_answered_in_order() -> None:
    session = opened()
    out = chat(session, "r1", now=1.0)
    assert sent(out) == [{"id": "r1", "seq": 1, "type": "accepted"}]
    assert tallies(out) == [("accepted", "")]
    publish = one(out, PublishFrame)
    assert publish.subject == request_frames("gateway", CONN, request_key(USER, "r1"), partitions=1)
    assert session.inflight == 1
    frames = answer_frames("r1", ["Hel", "lo"])
    # Out of order and twice over: the client still gets each seq once, in order.
    out = feed_bus(session, [frames[2], frames[0], frames[2], frames[1], frames[3], frames[1]], 1.5)
    got = sent(out)
    assert [f["seq"] for f in got] == [2, 3, 4, 5] and answer_of(got) == "Hello"
    assert ("ttft", "") in tallies(out) and ("finished", "completed") in tallies(out)
    ttft = next(t for t in of(out, Tally) if t.metric is Metric.TTFT)
    assert ttft.value == pytest.approx(0.5)
    assert session.inflight == 0
    assert feed_bus(session, frames) == [], "nothing follows the end"


def test_the_worker_may_answer_before_the_store_returns() -> None:
    session = opened()
    session.receive_client(client({"type": "chat", "id": "r1", "query": "hi"}), 0.0)
    session.rate_checked("r1", 0.0)
    early = feed_bus(session, answer_frames("r1", ["x"]))
    assert sent(early) == [], "seq 1 is the gateway's: the rest waits for it"
    done = session.job_stored("r1", 0.1, duplicate=False)
    assert [f["type"] for f in sent(done)] == ["accepted", "start", "delta", "end"]


def test_refusals_tie_the_error_to_the_request() -> None:
    session = opened(max_inflight_per_connection=1, max_inflight_per_user=5)
    chat(session, "r1")
    capped = session.receive_client(client({"type": "chat", "id": "r2", "query": "q"}), 0.0)
    assert [(f["code"], f["id"], f["seq"]) for f in sent(capped)] == [
        ("too_many_inflight", "r2", 1)
    ]
    assert ("refusal", "inflight_limit") in tallies(capped)
    # The per-user cap counts what the pump reports for all of the user's connections.
    other = opened(max_inflight_per_user=2)
    over = other.receive_client(
        client({"type": "chat", "id": "r3", "query": "q"}), 0.0, user_inflight=2
    )
    assert sent(over)[0]["code"] == "too_many_inflight" and not of(over, CheckRate)
    # A chat over the user's rate never reaches the store.
    other.receive_client(client({"type": "chat", "id": "r4", "query": "q"}), 0.0)
    limited = other.rate_checked("r4", 0.0, RateLimited("slow down", retry_after_s=2.5))
    (error,) = sent(limited)
    assert (error["code"], error["id"], error["seq"], error["retry_after_ms"]) == (
        "rate_limited",
        "r4",
        1,
        2500,
    )
    assert not of(limited, StoreJob) and other.inflight == 0


def test_a_chat_already_running_here_is_refused_connection_level() -> None:
    session = opened()
    chat(session, "r1")
    out = session.receive_client(client({"type": "chat", "id": "r1", "query": "again"}), 0.0)
    (error,) = sent(out)
    assert error["code"] == "duplicate_id" and "id" not in error


def test_a_job_that_cannot_be_stored_fails_at_seq_1_and_leaves_nothing() -> None:
    session = opened()
    session.receive_client(client({"type": "chat", "id": "r1", "query": "q"}), 0.0)
    session.rate_checked("r1", 0.0)
    out = session.store_failed("r1", BUS_DOWN, 0.0)
    assert [(f["code"], f["seq"]) for f in sent(out)] == [("bus_unavailable", 1)]
    assert session.inflight == 0
    assert of(chat(session, "r1"), PublishFrame), "the same id can be asked again"


def test_the_duplicate_chat_path_replays_the_stored_request() -> None:
    session = opened()
    out = chat(session, "r1", duplicate=True)
    assert not sent(out), "no second accepted: the kept frames hold the first"
    replay = one(out, StartReplay)
    assert replay.key == request_key(USER, "r1")
    assert session.replay_started(replay.serial) == []
    kept = [encode_accepted("r1"), *answer_frames("r1", ["a", "b"])]
    assert [f["seq"] for f in sent(feed_bus(session, kept))] == [1, 2, 3, 4, 5]
    assert session.inflight == 0


def test_a_failed_duplicate_replay_leaves_no_request_behind() -> None:
    session = opened(idle_timeout_s=30.0)
    replay = one(chat(session, "r1", now=1.0, duplicate=True), StartReplay)
    assert session.next_deadline() is None, "a live request holds off the idle timeout"
    out = session.replay_failed(replay.serial, BUS_DOWN, 2.0)
    # The request fails once, retryable, instead of hanging; nothing of it stays.
    assert [(f["code"], f["id"], f["seq"], f["retryable"]) for f in sent(out)] == [
        ("bus_unavailable", "r1", 1, True)
    ]
    assert session.inflight == 0 and session.next_deadline() == 32.0
    # The same chat again is taken up again, not refused as a duplicate.
    again = session.receive_client(client({"type": "chat", "id": "r1", "query": "hi"}), 3.0)
    assert of(again, CheckRate)


def encode_accepted(rid: str) -> bytes:
    return orjson.dumps({"id": rid, "seq": 1, "type": "accepted"})


# --- resume -------------------------------------------------------------------------------


def resume(session: Session, rid: str, after: int, now: float = 0.0) -> StartReplay:
    out = session.receive_client(client({"type": "resume", "id": rid, "after": after}), now)
    assert one(out, LookUp) == LookUp(rid, request_key(USER, rid))
    replay: StartReplay = one(session.looked_up(rid, found=True), StartReplay)
    return replay


def test_resume_replays_what_the_client_lacks_then_counts_it() -> None:
    session = opened()
    replay = resume(session, "r1", after=3)
    assert tallies(session.replay_started(replay.serial)) == [("resume", "replayed")]
    kept = [encode_accepted("r1"), *answer_frames("r1", ["a", "b", "c"])]
    out = feed_bus(session, kept)
    assert [f["seq"] for f in sent(out)] == [4, 5, 6]
    assert StopReplay(replay.serial) in out and session.inflight == 0


def test_a_resume_whose_replay_nats_could_not_start_is_retried_not_failed() -> None:
    session = opened(idle_timeout_s=30.0)
    replay = resume(session, "r1", after=2, now=1.0)
    out = session.replay_failed(replay.serial, BUS_DOWN, 2.0)
    assert tallies(out) == [("resume", "refused")], "never counted as replayed"
    # too_busy with the id and no seq: the request is untouched, the client resumes again.
    [frame] = sent(out)
    assert (frame["code"], frame["id"], "seq" in frame) == ("too_busy", "r1", False)
    assert frame["retryable"] is True and frame["retry_after_ms"] > 0
    assert session.inflight == 0 and session.next_deadline() == 32.0
    # A later resume of the same id is not a no-op: it looks the request up again.
    later = resume(session, "r1", after=2, now=3.0)
    assert tallies(session.replay_started(later.serial)) == [("resume", "replayed")]


def test_a_resume_refused_as_too_busy_leaves_the_request_untouched_for_a_retry() -> None:
    session = opened()
    out = session.receive_client(client({"type": "resume", "id": "r1", "after": 2}), 0.0)
    assert one(out, LookUp).request_id == "r1"
    busy = TooBusy("busy", retry_after_s=0.5, request_id="r1")
    out = session.resume_refused("r1", busy)
    assert tallies(out) == [("resume", "refused")]
    [error] = sent(out)
    # No seq: the frame at seq 3 is still to come; the client resumes again after the hint.
    assert error["code"] == "too_busy" and error["id"] == "r1" and "seq" not in error
    assert error["retryable"] is True and error["retry_after_ms"] == 500
    assert session.inflight == 0
    later = resume(session, "r1", after=2)
    assert tallies(session.replay_started(later.serial)) == [("resume", "replayed")]


def test_resume_of_an_unknown_or_expired_request_fails_it_at_after_plus_1() -> None:
    session = opened()
    session.receive_client(client({"type": "resume", "id": "gone", "after": 4}), 0.0)
    out = session.looked_up("gone", found=False)
    assert [(f["code"], f["seq"]) for f in sent(out)] == [("unknown_request", 5)]
    assert tallies(out) == [("resume", "unknown")]
    # The oldest kept frame is past what the client holds: no partial answer as a whole one.
    replay = resume(session, "old", after=1)
    session.replay_started(replay.serial)
    out = session.receive_bus(answer_frames("old", ["x"], first=7)[0], 0.0)
    assert [(f["code"], f["seq"]) for f in sent(out)] == [("unknown_request", 2)]
    assert StopReplay(replay.serial) in out and session.inflight == 0


def test_resume_of_a_request_live_here_changes_nothing() -> None:
    session = opened()
    chat(session, "r1")
    assert session.receive_client(client({"type": "resume", "id": "r1", "after": 0}), 0.0) == [
        Tally(Metric.FRAME_IN, "resume")
    ]


def test_a_failed_look_up_fails_the_resumed_request_and_keeps_nothing() -> None:
    session = opened()
    session.receive_client(client({"type": "resume", "id": "r1", "after": 0}), 0.0)
    out = session.lookup_failed("r1", BUS_DOWN)
    assert tallies(out) == [("resume", "error")] and session.inflight == 0
    assert [(f["code"], f["id"], f["seq"]) for f in sent(out)] == [("bus_unavailable", "r1", 1)]
    with pytest.raises(SessionError):
        session.looked_up("r1", found=True)


def test_a_replay_that_starts_after_its_request_ended_is_stopped() -> None:
    session = opened()
    replay = resume(session, "r1", after=0)
    feed_bus(session, [encode_accepted("r1"), *answer_frames("r1", [])])  # arrived first
    assert session.inflight == 0
    assert StopReplay(replay.serial) in session.replay_started(replay.serial)
    with pytest.raises(SessionError):
        session.replay_started(replay.serial)


# --- reordering and catch-up ----------------------------------------------------------------


def test_a_missing_frame_is_read_back_from_the_stream_after_a_moment() -> None:
    session = opened()
    chat(session, "r1", now=0.0)
    frames = answer_frames("r1", ["a", "b"])
    out = feed_bus(session, [frames[0], frames[2]], now=0.0)  # seq 3 lost on the way
    assert [f["seq"] for f in sent(out)] == [2]
    assert session.next_deadline() == GAP_WAIT_S
    assert session.tick(0.5) == []
    caught = session.tick(GAP_WAIT_S)
    replay = one(caught, StartReplay)
    assert of(caught, Log)[0].message.startswith("frames missing")
    session.replay_started(replay.serial)
    kept = [encode_accepted("r1"), *frames]
    assert [f["seq"] for f in sent(feed_bus(session, kept, 1.1))] == [3, 4, 5]


def test_a_late_frame_cancels_the_catch_up() -> None:
    session = opened()
    chat(session, "r1")
    frames = answer_frames("r1", ["a"])
    feed_bus(session, [frames[1]])
    feed_bus(session, [frames[0]])
    assert session.tick(GAP_WAIT_S) == []


def test_a_catch_up_that_cannot_start_retries_with_backoff() -> None:
    session = opened()
    chat(session, "r1")
    feed_bus(session, [answer_frames("r1", ["a"])[1]])
    now, waits = GAP_WAIT_S, []
    for _ in range(5):
        replay = one(session.tick(now), StartReplay)
        session.replay_failed(replay.serial, BUS_DOWN, now)
        deadline = session.next_deadline()
        assert deadline is not None
        waits.append(deadline - now)
        now = deadline
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_nats_reconnect_reads_every_live_request_back() -> None:
    session = opened()
    chat(session, "r1")
    chat(session, "r2")
    out = session.bus_reconnected()
    assert sorted(r.request_id for r in of(out, StartReplay)) == ["r1", "r2"]
    assert session.bus_reconnected() == [], "one catch-up at a time"


def test_too_many_frames_behind_a_gap_fail_the_request() -> None:
    session = opened(reorder_window=2)
    chat(session, "r1")
    frames = answer_frames("r1", ["a", "b", "c"])
    out = feed_bus(session, frames[1:4])
    (error,) = sent(out)
    assert (error["code"], error["seq"]) == ("internal_error", 2)
    assert ("finished", "error") in tallies(out) and session.inflight == 0


def test_a_malformed_bus_frame_is_dropped() -> None:
    session = opened()
    for data in (b"not json", b"[1]", b'{"id": 1, "seq": "x", "type": "delta"}', b"{}"):
        assert of(session.receive_bus(data, 0.0), Log), data


# --- the clock: idleness and token expiry -------------------------------------------------


def test_idle_closes_with_4103_but_not_while_an_answer_streams() -> None:
    session = opened(idle_timeout_s=10.0)
    assert session.tick(9.9) == []
    session.receive_client(client({"type": "ping"}), 5.0)  # activity moves the deadline
    assert session.next_deadline() == 15.0
    chat(session, "r1", now=6.0)
    assert session.next_deadline() is None and session.tick(100.0) == []
    feed_bus(session, answer_frames("r1", ["x"]), now=100.0)  # its end is activity
    assert session.tick(109.0) == []
    assert_closes(session.tick(110.0), CloseCode.IDLE_TIMEOUT, "idle_timeout")


def test_token_expiry_closes_with_4002_unless_a_fresh_token_comes() -> None:
    session = opened(expires_at=50.0)
    assert session.next_deadline() == 50.0
    token = "a.b.c"
    assert one(
        session.receive_client(client({"type": "auth", "token": token}), 10.0), VerifyToken
    ) == (VerifyToken(token))
    assert of(session.token_verified(USER, 90.0), Log)
    assert session.tick(50.0) == [] and session.next_deadline() == 90.0
    assert_closes(session.tick(90.0), CloseCode.TOKEN_EXPIRED, "token_expired")


@pytest.mark.parametrize(
    ("refusal", "code", "error"),
    [
        (Unauthorized("forged"), CloseCode.UNAUTHORIZED, "unauthorized"),
        (TokenExpired("already expired"), CloseCode.TOKEN_EXPIRED, "token_expired"),
    ],
)
def test_a_bad_fresh_token_closes(refusal: TokenwireError, code: CloseCode, error: str) -> None:
    session = opened(expires_at=50.0)
    out = session.token_refused(refusal)
    assert_closes(out, code, error)
    assert ("refusal", "auth") in tallies(out)


def test_a_fresh_token_for_another_user_is_forbidden_and_a_jwks_outage_is_not_fatal() -> None:
    session = opened(expires_at=50.0)
    assert_closes(session.token_verified("eve", 90.0), CloseCode.FORBIDDEN, "forbidden")
    other = opened(expires_at=50.0)
    out = other.token_refused(InternalError("JWKS unreachable"))
    assert [f["code"] for f in sent(out)] == ["internal_error"] and other.state is S.OPEN


def test_auth_frames_are_ignored_without_authentication() -> None:
    session = opened(requires_token=False)
    assert session.receive_client(client({"type": "auth", "token": "t"}), 0.0) == [
        Tally(Metric.FRAME_IN, "auth")
    ]


# --- frame rate and bad frames ------------------------------------------------------------


def test_the_frame_rate_refuses_a_flood_and_refills_with_time() -> None:
    session = opened(frame_rate="1/s", frame_burst=2)
    ping = client({"type": "ping"})
    assert [f["type"] for f in sent(session.receive_client(ping, 0.0))] == ["pong"]
    assert [f["type"] for f in sent(session.receive_client(ping, 0.0))] == ["pong"]
    flood = session.receive_client(ping, 0.0)
    (error,) = sent(flood)
    assert error["code"] == "rate_limited" and error["retry_after_ms"] == 1000
    assert "id" not in error and ("refusal", "rate_limit") in tallies(flood)
    # A refused chat is a request that ends at once: its error names it.
    refused = session.receive_client(client({"type": "chat", "id": "r9", "query": "q"}), 0.5)
    assert [(f["code"], f["id"], f["seq"]) for f in sent(refused)] == [("rate_limited", "r9", 1)]
    assert not of(refused, CheckRate)
    assert [f["type"] for f in sent(session.receive_client(ping, 1.0))] == ["pong"]


def test_bad_frames_get_errors_and_nothing_else_changes() -> None:
    session = opened()
    chat(session, "r1")
    for data, code in (
        ("{not json", "bad_json"),
        (client({"type": "teleport", "id": "r1"}), "unknown_type"),
        (b"\xff\xfe", "bad_json"),
    ):
        out = session.receive_client(data, 0.0)
        (error,) = sent(out)
        assert error["code"] == code and "id" not in error
        assert tallies(out) == [("frame_in", "invalid"), ("refusal", "frame")]
    invalid = session.receive_client(client({"type": "chat", "id": "r2", "query": ""}), 0.0)
    assert [(f["code"], f["id"], f["seq"]) for f in sent(invalid)] == [("invalid_frame", "r2", 1)]
    assert session.inflight == 1


def test_frame_too_large_names_the_request_whenever_its_id_can_be_read() -> None:
    session = opened()
    big = "x" * 70_000
    out = session.receive_client(client({"type": "chat", "id": "big", "query": big}), 0.0)
    assert [(f["code"], f["id"], f["seq"]) for f in sent(out)] == [("frame_too_large", "big", 1)]
    # The id after the oversize field is found too.
    late = '{"type":"chat","query":"' + big + '","id":"late"}'
    assert sent(session.receive_client(late, 0.0))[0]["id"] == "late"
    # No readable id, or the id of a request live here (its seq must not be disturbed).
    chat(session, "r1")
    for data in ('{"type":"chat","query":"' + big + '"}', client({"id": "r1", "q": big})):
        (error,) = sent(session.receive_client(data, 0.0))
        assert error["code"] == "frame_too_large" and "id" not in error


@pytest.mark.parametrize(
    ("data", "rid"),
    [
        ('{"type":"chat","id":"r1","query":"q"}', "r1"),
        ('{ "id" : "r1" }', "r1"),
        ('{"query":"say \\"id\\":\\"fake\\"","id":"real"}', "real"),
        ('{"inputs":{"id":"nested"},"id":"top"}', "top"),
        ('{"inputs":[{"id":"nested"}]}', None),
        ('{"id":"a\\u0062c"}', "abc"),
        ('{"id":"has space"}', None),
        ('{"id":12}', None),
        ('{"query":"cut short', None),
        ('["id","x"]', None),
        ("", None),
        (b'{"id":"bytes"}', "bytes"),
    ],
)
def test_peek_request_id(data: str | bytes, rid: str | None) -> None:
    assert peek_request_id(data) == rid


def test_the_peek_is_bounded() -> None:
    hostile = "{" + '"k":[],' * 10_000 + '"id":"far"}'
    assert peek_request_id(hostile) is None


def test_stop_and_ping() -> None:
    session = opened()
    assert one(session.receive_client(client({"type": "stop", "id": "r1"}), 0.0), RequestStop) == (
        RequestStop(request_key(USER, "r1"))
    )
    assert [f["code"] for f in sent(session.stop_failed(BUS_DOWN))] == ["bus_unavailable"]


def test_results_never_asked_for_are_bugs() -> None:
    session = opened()
    for feed in (
        lambda: session.rate_checked("nope", 0.0),
        lambda: session.looked_up("nope", found=True),
        lambda: session.lookup_failed("nope", BUS_DOWN),
        lambda: session.replay_started(99),
        lambda: session.replay_failed(99, BUS_DOWN, 0.0),
    ):
        with pytest.raises(SessionError):
            feed()


# --- interleavings: client frames, bus frames, I/O results and the clock --------------------

IDS = ["a", "b"]
MAX_FRAME = 4096


@dataclass
class World:
    """A fake pump and a fake cluster around one session: I/O waits until a step resolves it,
    bus frames wait until a step delivers (or loses, or repeats) them."""

    session: Session
    now: float = 0.0
    io: list[Command] = field(default_factory=list)
    bus: list[tuple[bytes, bool]] = field(default_factory=list)  # (frame, from a replay)
    kept: dict[str, list[bytes]] = field(default_factory=dict)
    stored: set[str] = field(default_factory=set)
    received: list[dict[str, Any]] = field(default_factory=list)
    close_seen: bool = False
    open: dict[str, int] = field(default_factory=dict)  # id -> last seq of its open episode
    starts: dict[str, Counter[int]] = field(default_factory=dict)  # seqs an episode may start at
    answer_len: int = 2
    junk_after_end: bool = False
    backwards: bool = False  # the settling delivers the newest bus frame first
    lost: bool = False  # a live frame was lost: NATS reconnects (that is when core NATS loses)

    def feed(self, commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, Send):
                assert not self.close_seen, "a frame was sent after the close"
                self.receive(orjson.loads(command.data))
            elif isinstance(command, Close):
                self.close_seen = True
            elif isinstance(command, PublishFrame):
                self.kept.setdefault(command.subject.rsplit(".", 1)[1], []).append(command.data)
            elif isinstance(command, (Tally, Log, Unsubscribe, StopReplay)):
                pass
            else:
                self.io.append(command)

    def receive(self, frame: dict[str, Any]) -> None:
        """What the client checks: per request, episodes of consecutive seqs, each started by
        something the client sent and ended by exactly one end or error."""
        self.received.append(frame)
        if "id" not in frame:
            return
        if "seq" not in frame:
            # A refusal that leaves the request untouched: the client resumes it again later.
            assert (frame["type"], frame["code"]) == ("error", "too_busy"), frame
            return
        rid, seq = frame["id"], frame["seq"]
        last = self.open.get(rid)
        if last is None:
            allowed = self.starts.setdefault(rid, Counter())
            assert allowed[seq] > 0, f"{rid}: seq {seq} starts nothing the client asked for"
            allowed[seq] -= 1
        else:
            assert seq == last + 1, f"{rid}: seq {seq} after {last}"
        if frame["type"] in ("end", "error"):
            self.open.pop(rid, None)
        else:
            self.open[rid] = seq

    def client(self, obj: dict[str, Any] | str, starts: int | None = None) -> None:
        if starts is not None:
            rid = obj["id"] if isinstance(obj, dict) else "a"
            self.starts.setdefault(rid, Counter())[starts] += 1
        data = obj if isinstance(obj, str) else orjson.dumps(obj).decode()
        self.feed(self.session.receive_client(data, self.now, user_inflight=self.session.inflight))

    def resolve(self, index: int, ok: bool) -> None:
        command = self.io.pop(index % len(self.io))
        s, now = self.session, self.now
        if isinstance(command, CheckRate):
            refusal = None if ok else RateLimited("slow down", retry_after_s=1.0)
            self.feed(s.rate_checked(command.request_id, now, refusal))
        elif isinstance(command, StoreJob):
            job = command.job
            if not ok:
                self.feed(s.store_failed(job.id, BUS_DOWN, now))
                return
            duplicate = job.key in self.stored
            self.stored.add(job.key)
            self.feed(s.job_stored(job.id, now, duplicate=duplicate))
            if not duplicate:
                frames = answer_frames(job.id, ["t"] * self.answer_len)
                if self.junk_after_end:  # a buggy worker: nothing after `end` may reach a client
                    frames.append(encode(Delta(id=job.id, seq=len(frames) + 2, text="junk")))
                self.kept.setdefault(job.key, []).extend(frames)
                self.bus += [(f, False) for f in frames]
        elif isinstance(command, LookUp):
            if ok:
                self.feed(s.looked_up(command.request_id, found=command.key in self.kept))
            else:
                self.feed(s.lookup_failed(command.request_id, BUS_DOWN))
        elif isinstance(command, StartReplay):
            if ok:
                self.feed(s.replay_started(command.serial))
                self.bus += [(f, True) for f in self.kept.get(command.key, [])]
            else:
                self.feed(s.replay_failed(command.serial, BUS_DOWN, now))
        elif isinstance(command, RequestStop):
            if not ok:
                self.feed(s.stop_failed(BUS_DOWN))
        else:  # pragma: no cover - the session asks for nothing else here
            raise AssertionError(command)

    def deliver(self, index: int, mode: str) -> None:
        data, replayed = self.bus.pop(index % len(self.bus))
        if mode == "lose" and not replayed:
            self.lost = True  # core NATS lost it; ordered consumers do not lose frames
            return
        if mode == "repeat":
            self.bus.append((data, replayed))
        self.feed(self.session.receive_bus(data, self.now))

    def settle(self) -> None:
        """Everything succeeds from now on, time passes: every request must end."""
        self.run(clock=False)
        if self.lost:
            self.feed(self.session.bus_reconnected())
        self.run(clock=True)

    def run(self, *, clock: bool) -> None:
        for _ in range(10_000):
            if self.io:
                self.resolve(0, ok=True)
            elif self.bus:
                self.deliver(-1 if self.backwards else 0, "deliver")
            elif (
                clock and (deadline := self.session.next_deadline()) is not None and deadline < 1e6
            ):
                self.now = max(self.now, deadline)
                self.feed(self.session.tick(self.now))
            else:
                return
        raise AssertionError("the world never settled")


rids = st.sampled_from(IDS)
resolve = st.tuples(st.just("resolve"), st.integers(0, 50), st.sampled_from([True, True, False]))
deliver = st.tuples(
    st.just("bus"), st.integers(0, 50), st.sampled_from(["deliver", "deliver", "lose", "repeat"])
)
steps = st.one_of(
    st.tuples(st.just("chat"), rids),
    st.tuples(st.just("resume"), rids, st.integers(0, 2)),
    resolve,
    deliver,
    st.tuples(st.just("chat"), rids),
    st.tuples(st.just("resume"), rids, st.integers(0, 2)),
    resolve,
    deliver,
    resolve,
    deliver,
    st.tuples(st.just("stop"), rids),
    st.tuples(st.just("ping")),
    st.tuples(st.just("garbage"), st.sampled_from(["{", "[]", '{"type":"chat","id":"a"}'])),
    st.tuples(st.just("oversize"), rids),
    st.tuples(st.just("tick"), st.floats(0.0, 3.0)),
    st.tuples(st.just("reconnected")),
    st.tuples(st.just("close"), st.sampled_from([CloseCode.DRAINING, CloseCode.SLOW_CONSUMER])),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The zombie paths, always tried: a resume, and a chat sent again, whose replay cannot start.
@example(
    script=[("resume", "b", 0), ("resolve", 0, True), ("resolve", 0, False)],
    answer_len=1,
    window=4,
    junk=False,
    backwards=False,
)
@example(
    script=[("chat", "b"), ("resolve", 0, True), ("resolve", 0, True), ("resolve", 0, False)],
    answer_len=1,
    window=4,
    junk=False,
    backwards=False,
)
@given(
    script=st.lists(steps, min_size=5, max_size=80),
    backwards=st.booleans(),
    answer_len=st.integers(0, 3),
    window=st.integers(1, 8),
    junk=st.booleans(),
)
def test_interleavings_keep_every_promise(
    script: list[tuple[Any, ...]], answer_len: int, window: int, junk: bool, backwards: bool
) -> None:
    session = opened(
        frame_rate="5/s",
        frame_burst=20,
        idle_timeout_s=1e9,
        reorder_window=window,
        limits=ClientLimits(max_frame_bytes=MAX_FRAME),
    )
    world = World(session, answer_len=answer_len, junk_after_end=junk, backwards=backwards)
    # "b" was asked on an earlier connection: resuming it, or sending its chat again, replays.
    earlier = request_key(USER, "b")
    world.kept[earlier] = [encode_accepted("b"), *answer_frames("b", ["old"] * answer_len)]
    world.stored.add(earlier)
    for step in script:
        kind = step[0]
        if kind == "chat":
            world.client({"type": "chat", "id": step[1], "query": "q"}, starts=1)
        elif kind == "resume":
            world.client({"type": "resume", "id": step[1], "after": step[2]}, starts=step[2] + 1)
        elif kind == "stop":
            world.client({"type": "stop", "id": step[1]})
        elif kind == "ping":
            world.client({"type": "ping"})
        elif kind == "garbage":
            world.client(step[1], starts=1)
        elif kind == "oversize":
            world.client({"type": "chat", "id": step[1], "query": "x" * MAX_FRAME}, starts=1)
        elif kind == "resolve" and world.io:
            world.resolve(step[1], step[2])
        elif kind == "bus" and world.bus:
            world.deliver(step[1], step[2])
        elif kind == "tick":
            world.now += step[1]
            world.feed(session.tick(world.now))
        elif kind == "reconnected":
            world.feed(session.bus_reconnected())
        elif kind == "close":
            world.feed(session.close(step[1]))
    world.settle()
    if session.state is ConnectionState.OPEN:
        assert world.open == {}, f"requests never ended: {world.open}"
        assert session.inflight == 0, "a request view was left behind"
    else:
        assert world.close_seen


def test_a_job_s_frames_go_to_this_gateway_s_connection_in_the_key_s_partition() -> None:
    """Workers answer on a subject only this gateway process hears, in the key's partition."""
    session = opened(gateway_id="gw-7", frame_partitions=3)
    out = session.receive_client(client({"type": "chat", "id": "r9", "query": "hi"}), 0.0)
    job = one(session.rate_checked(one(out, CheckRate).request_id, 0.0), StoreJob).job
    key = request_key(USER, "r9")
    assert job.reply == f"tw.frames.{frame_partition(key, 3)}.gw-7.{CONN}.{key}"
    publish = one(session.job_stored("r9", 0.0, duplicate=False), PublishFrame)
    assert publish.subject == job.reply  # `accepted` is kept with the worker's frames
