"""The simulator's pure core: deterministic answers, controls and Dify event scripts."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from itertools import groupby
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenwire.simulator.scenarios import (
    HOSTILE_TOKENS,
    REPLACEMENT_TEXT,
    ControlsError,
    Drop,
    Emit,
    SimConfig,
    SimControls,
    Stall,
    Step,
    StreamIds,
    answer_tokens,
    build_script,
    encode_event,
    expected_answer,
    expected_final_answer,
    parse_controls,
    stopped_events,
    usage,
)

IDS = StreamIds(
    task_id="7d6f0a8e-1b2c-4d3e-8f4a-5b6c7d8e9f00",
    message_id="0e1d2c3b-4a59-4687-9a8b-7c6d5e4f3a21",
    conversation_id="a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d",
    created_at=1_700_000_000,
)
CONFIG = SimConfig(token_delay_ms=10, tokens=20)
ENVELOPE = ("event", "conversation_id", "message_id", "created_at", "task_id")
USAGE_FIELDS = {
    "prompt_tokens", "prompt_unit_price", "prompt_price_unit", "prompt_price",
    "completion_tokens", "completion_unit_price", "completion_price_unit", "completion_price",
    "total_tokens", "total_price", "currency", "latency",
}  # fmt: skip


def script_for(query: str, **tw_sim: Any) -> list[Step]:
    inputs = {"tw_sim": tw_sim}
    return build_script(IDS, query, inputs, parse_controls(query, inputs), CONFIG)


def emits(script: list[Step]) -> list[Emit]:
    return [step for step in script if isinstance(step, Emit)]


def shape(script: list[Step]) -> list[str]:
    """Event names with runs collapsed: ["message+", "message_end"] reads like the docs."""
    names = [step.name if isinstance(step, Emit) else type(step).__name__ for step in script]
    return [name + ("+" if len(list(run)) > 1 else "") for name, run in groupby(names)]


def final_answer(script: list[Step]) -> str:
    answer = ""
    for step in emits(script):
        answer = step.apply_to(answer)
    return answer


def assert_envelopes(script: list[Step]) -> None:
    for step in emits(script):
        event = step.event
        assert event["conversation_id"] == IDS.conversation_id
        assert event["message_id"] == IDS.message_id
        assert event["created_at"] == IDS.created_at
        if step.name == "error":
            assert "task_id" not in event
        else:
            assert list(event)[:5] == list(ENVELOPE)
            assert event["task_id"] == IDS.task_id


# --------------------------------------------------------------------------- answers


@given(st.text(max_size=60), st.integers(min_value=1, max_value=120))
def test_tokens_concatenate_to_the_expected_answer(query: str, tokens: int) -> None:
    parts = answer_tokens(query, tokens)
    assert len(parts) == tokens
    assert all(parts)
    assert "".join(parts) == expected_answer(query, tokens)


def test_answer_is_deterministic_and_depends_on_the_query() -> None:
    assert answer_tokens("hello", 30) == answer_tokens("hello", 30)
    answers = {expected_answer(f"question {i}", 30) for i in range(20)}
    assert len(answers) == 20


def test_answer_is_the_same_in_another_process_with_another_hash_seed() -> None:
    code = "from tokenwire.simulator import expected_answer; print(expected_answer('déjà vu', 25))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed, "PYTHONIOENCODING": "utf-8"},
            capture_output=True,
            check=True,
            text=True,
            encoding="utf-8",
        ).stdout
        for seed in ("1", "2")
    }
    assert outputs == {expected_answer("déjà vu", 25) + "\n"}


@pytest.mark.parametrize("query", ["hello", "", "你好", "a" * 500, "/agent hi"])
@pytest.mark.parametrize("tokens", [8, 9, 40, 200])
def test_answer_mixes_markdown_newlines_cjk_and_emoji(query: str, tokens: int) -> None:
    answer = expected_answer(query, tokens)
    assert "**" in answer
    assert "\n- " in answer
    assert "\n\n" in answer
    assert any("\u4e00" <= ch <= "\u9fff" or "\uac00" <= ch <= "\ud7a3" for ch in answer)
    assert any(ord(ch) > 0xFFFF for ch in answer), "an emoji outside the BMP (4 UTF-8 bytes)"
    assert any(ch in ",;:!?." for ch in answer)
    assert len(answer.encode("utf-8")) > len(answer)


@pytest.mark.parametrize("tokens", [0, -1, 100_001])
def test_answer_length_out_of_range_is_refused(tokens: int) -> None:
    with pytest.raises(ValueError, match="tokens"):
        answer_tokens("q", tokens)


# --------------------------------------------------------------------------- controls


def test_controls_default_when_absent() -> None:
    assert parse_controls("hello", {}) == SimControls()
    assert parse_controls("hello", {"tw_sim": None}) == SimControls()


def test_controls_from_query_prefix_and_tw_sim_wins() -> None:
    assert parse_controls("/agent what?", {}).scenario == "agent"
    assert parse_controls("/chatflow", {}).scenario == "chatflow"
    assert parse_controls("/agents are", {}).scenario == "chat", "a prefix is a whole word"
    slow = parse_controls("/slow hi", {})
    assert slow.delay_ms is not None and slow.delay_ms >= 100
    assert slow.first_token_delay_ms is not None and slow.first_token_delay_ms >= 1000
    both = parse_controls("/agent hi", {"tw_sim": {"scenario": "tts", "tokens": 3}})
    assert (both.scenario, both.tokens) == ("tts", 3)


def test_controls_read_every_key() -> None:
    tw_sim = {
        "scenario": "replace",
        "delay_ms": 1,
        "tokens": 7,
        "first_token_delay_ms": 2.5,
        "ping_interval_s": 0.5,
        "fault": 500,
        "cut_after": 0,
        "fault_times": 2,
    }
    assert parse_controls("q", {"tw_sim": tw_sim}) == SimControls(
        scenario="replace",
        delay_ms=1.0,
        tokens=7,
        first_token_delay_ms=2.5,
        ping_interval_s=0.5,
        fault="500",
        cut_after=0,
        fault_times=2,
    )
    assert parse_controls("q", {"tw_sim": {"fault": None, "tokens": None}}) == SimControls()


@pytest.mark.parametrize(
    "tw_sim",
    [
        {"scenario": "chatty"},
        {"fault": "boom"},
        {"tokens": 0},
        {"tokens": 1.5},
        {"delay_ms": -1},
        {"delay_ms": True},
        {"ping_interval_s": 0},
        {"cut_after": "3"},
        {"sceanrio": "agent"},
        "agent",
    ],
)
def test_bad_controls_are_refused(tw_sim: Any) -> None:
    with pytest.raises(ControlsError):
        parse_controls("q", {"tw_sim": tw_sim})


def test_expected_final_answer_per_scenario() -> None:
    assert expected_final_answer("q", tokens=12) == expected_answer("q", 12)
    assert expected_final_answer("q", {"tokens": 9}) == expected_answer("q", 9)
    assert expected_final_answer("q", {"scenario": "replace"}) == REPLACEMENT_TEXT
    assert expected_final_answer("/replace q") == REPLACEMENT_TEXT
    hostile = expected_final_answer("/hostile q", tokens=10)
    assert "<script>alert(1)</script>" in hostile
    assert "<img src=x onerror=alert(1)>" in hostile
    assert hostile.replace("".join(HOSTILE_TOKENS), "") == expected_answer("/hostile q", 10)


# --------------------------------------------------------------------------- scripts


def test_chat_script_is_message_deltas_then_message_end() -> None:
    script = script_for("hi")
    assert shape(script) == ["message+", "message_end"]
    assert [s.event["answer"] for s in emits(script)[:-1]] == answer_tokens("hi", 20)
    assert final_answer(script) == expected_final_answer("hi", tokens=20)
    assert_envelopes(script)
    end = emits(script)[-1].event
    assert end["id"] == IDS.message_id
    assert set(end["metadata"]["usage"]) == USAGE_FIELDS
    assert end["metadata"]["usage"]["completion_tokens"] == 20
    resource = end["metadata"]["retriever_resources"][0]
    assert set(resource) >= {
        "position", "dataset_id", "dataset_name", "document_id",
        "document_name", "segment_id", "score", "content",
    }  # fmt: skip


def test_agent_script_upserts_thoughts_and_streams_agent_messages() -> None:
    script = script_for("q", scenario="agent")
    assert shape(script) == [
        "agent_thought+", "agent_message+", "message_file", "agent_thought", "message_end",
    ]  # fmt: skip
    thoughts = [s.event for s in emits(script) if s.name == "agent_thought"]
    first_id = thoughts[0]["id"]
    first = [t for t in thoughts if t["id"] == first_id]
    assert len(first) >= 2, "the same thought id is sent again as it grows"
    sizes = [len(t["thought"]) + len(t["observation"]) for t in first]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]
    file_event = next(s.event for s in emits(script) if s.name == "message_file")
    assert (file_event["type"], file_event["belongs_to"]) == ("image", "assistant")
    assert thoughts[-1]["message_files"] == [file_event["id"]]
    assert thoughts[-1]["thought"] == expected_final_answer("q", {"scenario": "agent"}, tokens=20)
    assert final_answer(script) == thoughts[-1]["thought"]
    assert_envelopes(script)


def test_chatflow_script_wraps_the_answer_in_workflow_events() -> None:
    script = script_for("/chatflow q")
    assert shape(script) == [
        "workflow_started", "node_started", "node_finished", "node_started",
        "message+", "node_finished", "workflow_finished", "message_end",
    ]  # fmt: skip
    workflow = [s.event for s in emits(script) if s.name.startswith(("workflow", "node"))]
    assert len({e["workflow_run_id"] for e in workflow}) == 1
    assert workflow[-1]["data"]["status"] == "succeeded"
    assert workflow[-1]["data"]["outputs"]["answer"] == final_answer(script)
    assert final_answer(script) == expected_final_answer("/chatflow q", tokens=20)
    assert_envelopes(script)


def test_replace_script_ends_with_the_replacement_text() -> None:
    script = script_for("q", scenario="replace")
    assert shape(script) == ["message+", "message_replace", "message_end"]
    replace = next(s for s in emits(script) if s.name == "message_replace")
    assert replace.event["answer"] == REPLACEMENT_TEXT
    assert final_answer(script) == REPLACEMENT_TEXT == expected_final_answer("/replace q")
    assert_envelopes(script)


def test_tts_audio_comes_after_message_end() -> None:
    script = script_for("q", scenario="tts")
    assert shape(script) == ["message+", "message_end", "tts_message+", "tts_message_end"]
    audio = [s.event["audio"] for s in emits(script) if s.name == "tts_message"]
    assert all(audio) and emits(script)[-1].event["audio"] == ""
    assert final_answer(script) == expected_answer("q", 20)


def test_hostile_script_splits_markup_across_deltas() -> None:
    script = script_for("q", scenario="hostile")
    deltas = [s.event["answer"] for s in emits(script) if s.is_token]
    assert not any("<script>" in d for d in deltas), "no single delta holds the whole tag"
    assert "<script>alert(1)</script>" in final_answer(script)
    assert "<img src=x onerror=alert(1)>" in final_answer(script)


def test_delays_first_token_then_token_delay() -> None:
    script = script_for("q", first_token_delay_ms=500, delay_ms=3)
    delays = [s.delay_s for s in emits(script) if s.is_token]
    assert delays[0] == 0.5
    assert set(delays[1:]) == {0.003}
    assert shape(script_for("q", scenario="agent", first_token_delay_ms=0))[0] == "agent_thought+"


@pytest.mark.parametrize("scenario", ["chat", "agent", "chatflow"])
def test_error_event_fault_stops_after_cut_after_tokens(scenario: str) -> None:
    script = script_for("q", scenario=scenario, fault="error_event", cut_after=3)
    steps = emits(script)
    assert sum(s.is_token for s in steps) == 3
    error = steps[-1].event
    assert error["event"] == "error"
    assert (error["code"], error["status"]) == ("completion_request_error", 400)
    assert "message_end" not in shape(script)
    assert_envelopes(script)


def test_cut_fault_drops_after_cut_after_tokens_and_keeps_generating() -> None:
    script = script_for("q", fault="cut", cut_after=4)
    drop = next(i for i, s in enumerate(script) if isinstance(s, Drop))
    assert sum(isinstance(s, Emit) and s.is_token for s in script[:drop]) == 4
    assert shape(script) == ["message+", "Drop", "message+", "message_end"]
    assert final_answer(script) == expected_answer("q", 20)


def test_stall_fault_is_the_last_step() -> None:
    script = script_for("q", fault="stall", cut_after=2)
    assert isinstance(script[-1], Stall)
    assert sum(s.is_token for s in emits(script)) == 2
    assert shape(script_for("q", fault="stall", cut_after=0)) == ["Stall"]


def test_pre_stream_faults_do_not_change_the_script() -> None:
    assert shape(script_for("q", fault="500")) == ["message+", "message_end"]


def test_stopped_events() -> None:
    chat = stopped_events(
        IDS, query="q", scenario="chat", answer="Hi", completion_tokens=1, latency_s=0.2
    )
    assert [e["event"] for e in chat] == ["message_end"]
    assert chat[0]["metadata"]["usage"]["completion_tokens"] == 1
    flow = stopped_events(
        IDS, query="q", scenario="chatflow", answer="Hi", completion_tokens=1, latency_s=0.2
    )
    assert [e["event"] for e in flow] == ["workflow_finished", "message_end"]
    assert flow[0]["data"]["status"] == "stopped"


def test_usage_prices_are_decimal_strings_that_add_up() -> None:
    block = usage(1033, 135, 1.25)
    assert set(block) == USAGE_FIELDS
    assert block["total_tokens"] == 1168
    assert block["prompt_price"] == "0.0010330"
    assert block["completion_price"] == "0.0002700"
    assert Decimal(block["total_price"]) == Decimal(block["prompt_price"]) + Decimal(
        block["completion_price"]
    )
    assert usage(0, 0, 0)["total_price"] == "0.0000000", "never scientific notation"


def test_encode_event_styles() -> None:
    event = {"event": "message", "answer": "naïve 你好 🚀\n<b>"}
    compact = encode_event(event, "orjson")
    ascii_ = encode_event(event, "ascii")
    for frame in (compact, ascii_):
        assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
        assert frame.count(b"\n") == 2, "one line: newlines in strings are escaped"
        assert orjson.loads(frame[6:]) == event
    assert "你好 🚀".encode() in compact and b'"event":"message"' in compact
    assert ascii_ == b"data: " + json.dumps(event).encode() + b"\n\n"
    assert b"\\u4f60\\u597d" in ascii_ and b'"event": "message", ' in ascii_
    assert max(ascii_) < 128


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="json_style"):
        SimConfig(json_style="yaml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tokens"):
        SimConfig(tokens=0)
