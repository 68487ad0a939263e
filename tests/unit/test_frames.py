"""The frame codec: server frames round-trip; bad client frames get stable codes."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.exceptions import ClientError, ErrorCode, FrameTooLarge, UnknownRequest
from shared.frames import (
    Accepted,
    ChatFrame,
    ClientLimits,
    Delta,
    End,
    Event,
    Hello,
    ResumeFrame,
    StopFrame,
    decode_client_frame,
    decode_server_frame,
    encode,
    error_frame,
    peek_id_seq,
)

LIMITS = ClientLimits(
    max_frame_bytes=4096, max_query_chars=100, max_inputs_bytes=200, max_inputs_depth=3, max_files=2
)


def code_of(raw: str | bytes) -> str:
    with pytest.raises(ClientError) as info:
        decode_client_frame(raw, LIMITS)
    return info.value.code.value


def test_server_frames_round_trip_and_carry_type() -> None:
    for frame in (
        Hello(session="s", user="u", server="tw"),
        Accepted(id="a", seq=1),
        Delta(id="a", seq=2, text="héllo 世界 🎉"),
        Event(id="a", seq=3, event="agent_thought", data={"thought": "x"}),
        End(id="a", seq=4, conversation_id="c", message_id="m", usage={"total_tokens": 3}),
    ):
        wire = encode(frame)
        assert orjson.loads(wire)["type"] == frame.type
        assert decode_server_frame(wire) == frame


def test_connection_level_error_has_no_id_or_seq_and_request_error_has_both() -> None:
    conn = orjson.loads(encode(error_frame(UnknownRequest("nope"))))
    assert conn == {
        "type": "error",
        "code": "unknown_request",
        "message": "nope",
        "retryable": False,
    }
    req = orjson.loads(encode(error_frame(UnknownRequest("nope"), id="r", seq=7)))
    assert req["id"] == "r" and req["seq"] == 7


def test_peek_reads_id_seq_type() -> None:
    assert peek_id_seq(encode(Delta(id="q", seq=9, text="x"))) == ("q", 9, "delta")


def test_good_client_frames() -> None:
    chat = decode_client_frame(
        b'{"type":"chat","id":"r1","query":"hi","inputs":{"a":1},'
        b'"conversation_id":"5b6f7a34-8c2d-4b7e-9e11-2f0c3a1d9e10",'
        b'"files":[{"type":"image","transfer_method":"remote_url","url":"http://x"}]}',
        LIMITS,
    )
    assert isinstance(chat, ChatFrame) and chat.inputs == {"a": 1} and chat.files[0].type == "image"
    assert isinstance(decode_client_frame('{"type":"stop","id":"r1"}', LIMITS), StopFrame)
    resume = decode_client_frame('{"type":"resume","id":"r1","after":3}', LIMITS)
    assert isinstance(resume, ResumeFrame) and resume.after == 3


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json", ErrorCode.BAD_JSON),
        ("[1,2]", ErrorCode.BAD_JSON),
        ('{"id":"x"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type":"dance"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type":"chat","id":"x"}', ErrorCode.INVALID_FRAME),
        ('{"type":"chat","id":"has space","query":"q"}', ErrorCode.INVALID_FRAME),
        ('{"type":"chat","id":"x","query":""}', ErrorCode.INVALID_FRAME),
        ('{"type":"chat","id":"x","query":"' + "q" * 101 + '"}', ErrorCode.INVALID_FRAME),
        ('{"type":"chat","id":"x","query":"q","conversation_id":"nope"}', ErrorCode.INVALID_FRAME),
        (
            '{"type":"chat","id":"x","query":"q","inputs":{"a":{"b":{"c":{"d":1}}}}}',
            ErrorCode.INVALID_FRAME,
        ),
        (
            '{"type":"chat","id":"x","query":"q","inputs":{"a":"' + "x" * 300 + '"}}',
            ErrorCode.INVALID_FRAME,
        ),
        (
            '{"type":"chat","id":"x","query":"q","files":[{"type":"image","transfer_method":"remote_url"},'
            '{"type":"image","transfer_method":"remote_url"},{"type":"image","transfer_method":"remote_url"}]}',
            ErrorCode.INVALID_FRAME,
        ),
        ('{"type":"resume","id":"x","after":-1}', ErrorCode.INVALID_FRAME),
        ('{"type":"stop"}', ErrorCode.INVALID_FRAME),
    ],
)
def test_bad_client_frames_get_stable_codes(raw: str, code: ErrorCode) -> None:
    assert code_of(raw) == code.value


def test_oversize_frame() -> None:
    with pytest.raises(FrameTooLarge):
        decode_client_frame(b'{"type":"ping","pad":"' + b"x" * 5000 + b'"}', LIMITS)


def test_refusal_names_the_request_when_it_can() -> None:
    with pytest.raises(ClientError) as info:
        decode_client_frame('{"type":"chat","id":"r9"}', LIMITS)
    assert info.value.request_id == "r9"


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300),
        st.dictionaries(
            st.sampled_from(["type", "id", "query", "after", "inputs", "files"]),
            st.one_of(
                st.none(),
                st.integers(-(2**63), 2**63 - 1),
                st.text(max_size=20),
                st.sampled_from(["chat", "stop", "resume", "ping"]),
                st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
                st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**63 - 1), max_size=3),
            ),
        ).map(orjson.dumps),
    )
)
def test_only_client_errors_escape_decoding(raw: bytes | str) -> None:
    try:
        decode_client_frame(raw, LIMITS)
    except ClientError:
        pass
