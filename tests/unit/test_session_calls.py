"""The session's handling of ``call``: checked before NATS, its own rate, exactly one answer.

Driven like tests/unit/test_session.py: inputs in, commands out, no socket, no NATS.
"""

from __future__ import annotations

from typing import Any

import orjson

from shared.exceptions import BusRetryable, ErrorCode, NotFound, RateLimited
from shared.frames import Hello, decode_server_frame
from shared.session import (
    FEATURES,
    CallWorker,
    CheckCallRate,
    Command,
    Send,
    Session,
    SessionConfig,
)

USER = "ada"


def opened(**kw: Any) -> Session:
    session = Session(
        SessionConfig(frame_rate="1000/s", frame_burst=1000, **kw),
        conn_id="c0nn",
        user=USER,
        expires_at=None,
        now=0.0,
    )
    session.start()
    session.subscribed()
    return session


def sent(commands: list[Command]) -> list[dict[str, Any]]:
    return [orjson.loads(c.data) for c in commands if isinstance(c, Send)]


def call(session: Session, method: str, params: dict[str, Any] | None = None, id: str = "c1"):
    frame = {"type": "call", "id": id, "method": method, "params": params or {}}
    return session.receive_client(orjson.dumps(frame), 1.0)


def test_hello_announces_the_features_served() -> None:
    session = Session(SessionConfig(), conn_id="c", user=USER, expires_at=None, now=0.0)
    session.start()
    hello = next(c for c in session.subscribed() if isinstance(c, Send))
    frame = decode_server_frame(hello.data)
    assert isinstance(frame, Hello)
    assert frame.features == list(FEATURES)
    assert {"call", "files"} <= set(frame.features)


def test_a_call_spends_a_call_token_then_goes_to_a_worker_and_gets_one_result() -> None:
    session = opened()
    out = call(session, "conversations.list", {"limit": 5})
    assert [c for c in out if isinstance(c, CheckCallRate)] == [CheckCallRate("c1")]
    out = session.call_rate_checked("c1")
    assert out == [CallWorker("c1", "conversations.list", {"limit": 5})]
    out = session.call_answered("c1", {"data": [], "has_more": False, "limit": 5}, 2.0)
    assert sent(out) == [
        {"type": "result", "id": "c1", "data": {"data": [], "has_more": False, "limit": 5}}
    ]


def test_an_unknown_method_is_refused_before_any_rate_or_worker() -> None:
    session = opened()
    out = call(session, "admin.delete_everything")
    assert not [c for c in out if isinstance(c, CheckCallRate | CallWorker)]
    (error,) = sent(out)
    assert error["code"] == ErrorCode.UNKNOWN_METHOD.value
    assert error["id"] == "c1" and "seq" not in error


def test_bad_params_and_a_client_supplied_user_are_bad_params() -> None:
    session = opened()
    for params in ({"limit": 1000}, {"user": "someone-else"}, {"nonsense": 1}):
        (error,) = sent(call(session, "conversations.list", params))
        assert error["code"] == ErrorCode.BAD_PARAMS.value, params
    (error,) = sent(call(session, "conversations.delete", {"conversation_id": "../../apps"}))
    assert error["code"] == ErrorCode.BAD_PARAMS.value


def test_a_refused_rate_is_the_calls_one_error() -> None:
    session = opened()
    call(session, "app.parameters")
    limited = RateLimited("too many calls", retry_after_s=2.0, request_id="c1")
    (error,) = sent(session.call_rate_checked("c1", limited))
    assert error == {
        "type": "error",
        "code": "rate_limited",
        "message": "too many calls",
        "retryable": True,
        "id": "c1",
        "retry_after_ms": 2000,
    }


def test_a_failed_call_is_one_error_with_its_code_and_hint_and_the_id_is_free_again() -> None:
    session = opened()
    call(session, "app.info")
    session.call_rate_checked("c1")
    down = BusRetryable("cannot call a worker: no worker is running")
    down.retry_after_s = 1.0
    (error,) = sent(session.call_failed("c1", down, 2.0))
    assert (error["code"], error["retryable"], error["retry_after_ms"]) == (
        "bus_unavailable",
        True,
        1000,
    )
    assert "seq" not in error
    # The same id may be sent again (a client re-sends a call whose answer it lost).
    assert [c for c in call(session, "app.info") if isinstance(c, CheckCallRate)]


def test_not_found_from_the_worker_reaches_the_client_as_not_found() -> None:
    session = opened()
    call(session, "runs.get", {"workflow_run_id": "run-1"})
    session.call_rate_checked("c1")
    (error,) = sent(session.call_failed("c1", NotFound("runs.get: not found"), 2.0))
    assert error["code"] == "not_found" and error["retryable"] is False


def test_the_same_id_twice_while_waiting_is_a_duplicate() -> None:
    session = opened()
    call(session, "app.info")
    (error,) = sent(call(session, "app.info"))
    assert error["code"] == ErrorCode.DUPLICATE_ID.value


def test_calls_waiting_are_capped_per_connection() -> None:
    session = opened(max_inflight_per_connection=2)
    call(session, "app.info", id="a")
    call(session, "app.info", id="b")
    (error,) = sent(call(session, "app.info", id="c"))
    assert error["code"] == ErrorCode.TOO_MANY_INFLIGHT.value and error["id"] == "c"


def test_a_waiting_call_keeps_the_connection_from_idling_out() -> None:
    session = opened(idle_timeout_s=10.0)
    call(session, "app.info")
    session.call_rate_checked("c1")
    assert session.next_deadline() is None
    assert session.tick(100.0) == []
    session.call_answered("c1", {"name": "x"}, 100.0)
    assert session.next_deadline() == 110.0


def test_an_answer_after_the_close_sends_nothing() -> None:
    session = opened()
    call(session, "app.info")
    session.call_rate_checked("c1")
    session.client_left(1000)
    assert session.call_answered("c1", {"name": "x"}, 2.0) == []


def test_an_invalid_call_frame_is_answered_with_its_id_and_no_seq() -> None:
    session = opened()
    bad = {"type": "call", "id": "c9", "method": "x" * 100}
    (error,) = sent(session.receive_client(orjson.dumps(bad), 1.0))
    assert error["code"] == "invalid_frame" and error["id"] == "c9" and "seq" not in error
    huge = {"type": "call", "id": "c10", "method": "app.info", "params": {"x": "y" * 70_000}}
    (error,) = sent(session.receive_client(orjson.dumps(huge), 1.0))
    assert error["code"] == "frame_too_large" and error["id"] == "c10" and "seq" not in error
    # A chat keeps its seq 1.
    chat = {"type": "chat", "id": "r1", "query": "q", "conversation_id": "nope"}
    (error,) = sent(session.receive_client(orjson.dumps(chat), 1.0))
    assert error["id"] == "r1" and error["seq"] == 1


def test_a_call_over_the_frame_rate_is_answered_with_its_id() -> None:
    session = Session(
        SessionConfig(frame_rate="1/min", frame_burst=1),
        conn_id="c",
        user=USER,
        expires_at=None,
        now=0.0,
    )
    session.start()
    session.subscribed()
    call(session, "app.info", id="first")
    (error,) = sent(call(session, "app.info", id="second"))
    assert error["code"] == "rate_limited" and error["id"] == "second" and "seq" not in error
