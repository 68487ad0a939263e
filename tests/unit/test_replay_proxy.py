"""What a worker creates for a restricted gateway's replay (shared/replay_proxy.py), and the
permissions each process gets (tokenwire/natsperms.py)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js import api

from shared.exceptions import BadParams
from shared.replay_proxy import (
    ConsumerAsk,
    HasAsk,
    check_consumer,
    decode_ask,
    encode_consumer_ask,
    encode_has_ask,
    error_reply,
    has_reply,
    key_stream,
    read_has_reply,
)
from shared.subjects import (
    KeptSpan,
    gateway_frames,
    request_frames,
    request_frames_any_connection,
    request_key,
)
from tokenwire.natsperms import authorization, gateway_permissions

KEY = request_key("alice", "r1")


def _ordered(filter_subject: str, **extra: Any) -> dict[str, Any]:
    """The config nats-py's ordered consumer asks for."""
    config = api.ConsumerConfig(
        filter_subject=filter_subject,
        deliver_subject="_INBOX.gw-a.abc123",
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.NONE,
        max_deliver=1,
        flow_control=True,
        idle_heartbeat=5,
        mem_storage=True,
        num_replicas=1,
    )
    return config.evolve(**extra).as_dict()


@pytest.mark.parametrize("partitions", [1, 3])
def test_one_requests_frames_to_an_inbox_is_allowed_and_narrowed(partitions: int) -> None:
    subject = request_frames_any_connection(KEY, partitions=partitions)
    config = _ordered(subject, headers_only=True, sample_freq="100%", max_ack_pending=9)
    allowed = check_consumer(ConsumerAsk(key_stream(KEY, partitions), config), partitions)
    assert allowed["filter_subject"] == subject
    assert allowed["deliver_subject"] == "_INBOX.gw-a.abc123"
    assert allowed["ack_policy"] == "none" and allowed["mem_storage"] is True
    assert allowed["inactive_threshold"] > 0  # a dead gateway leaves nothing behind
    # Whatever else was asked is dropped, not passed on.
    assert not {"headers_only", "sample_freq", "max_ack_pending"} & set(allowed)


@pytest.mark.parametrize("partitions", [1, 3])
def test_one_requests_frames_on_one_literal_connection_are_allowed(partitions: int) -> None:
    subject = request_frames("gateway-0", "3f2a9c", KEY, partitions=partitions)
    config = _ordered(subject, deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=7)
    allowed = check_consumer(ConsumerAsk(key_stream(KEY, partitions), config), partitions)
    assert allowed["filter_subject"] == subject
    assert allowed["deliver_policy"] == "by_start_sequence" and allowed["opt_start_seq"] == 7


@given(st.text(min_size=1, max_size=60))
def test_any_other_filter_is_refused(filter_subject: str) -> None:
    exact = request_frames_any_connection(KEY, partitions=1)
    if filter_subject == exact or filter_subject.endswith(f".{KEY}"):
        return  # KEY's own frames (32 hex digits: text() all but never makes them)
    with pytest.raises(BadParams):
        check_consumer(ConsumerAsk(key_stream(KEY, 1), _ordered(filter_subject)), 1)


@pytest.mark.parametrize(
    "filter_subject",
    [
        "tw.frames.>",
        "tw.frames.0.*.*.*",
        "tw.frames.0.*.*.>",
        "tw.jobs.chat",
        f"tw.frames.0.gw.c.{KEY[:-1]}*",
        f"tw.frames.0.*.c.{KEY}",
        f"tw.frames.0.gw.*.{KEY}",
        f"tw.frames.0.gw.>.{KEY}",
        f"tw.frames.0.gw.c.d.{KEY}",
        f"tw.frames.0.gw..{KEY}",
        f"tw.frames.1.gw.c.{KEY}",
        f"tw.live.0.gw.c.{KEY}",
    ],
)
def test_wildcards_never_pass(filter_subject: str) -> None:
    with pytest.raises(BadParams, match="one request's frames"):
        check_consumer(ConsumerAsk("TW_FRAMES", _ordered(filter_subject)), 1)


@pytest.mark.parametrize(
    "deliver", ["tw.jobs.chat", "tw.frames.0.gw-b.c.k", "_INBOX.>", "_INBOX.*", "", "_INBOX"]
)
def test_it_delivers_only_to_an_inbox(deliver: str) -> None:
    config = _ordered(request_frames_any_connection(KEY, partitions=1))
    config["deliver_subject"] = deliver
    with pytest.raises(BadParams, match="inbox"):
        check_consumer(ConsumerAsk("TW_FRAMES", config), 1)


def test_the_stream_must_be_the_keys_partition() -> None:
    config = _ordered(request_frames_any_connection(KEY, partitions=1))
    with pytest.raises(BadParams, match="stream"):
        check_consumer(ConsumerAsk("TW_JOBS", config), 1)


def test_asks_round_trip_and_refusals_read_back() -> None:
    assert decode_ask(encode_has_ask(KEY)) == HasAsk(KEY)
    config = _ordered(request_frames_any_connection(KEY, partitions=1))
    assert decode_ask(encode_consumer_ask("TW_FRAMES", config)) == ConsumerAsk("TW_FRAMES", config)
    for bad in (b"[]", b"nope", orjson.dumps({"op": "has", "key": "tw.>"}), b'{"op":"x"}'):
        with pytest.raises(BadParams):
            decode_ask(bad)
    with pytest.raises(BadParams, match="no"):
        read_has_reply(error_reply(BadParams("no")))
    # Where the frames are rides along when they are on one subject; an older worker's answer
    # (no such fields) still reads.
    subject = request_frames("gw", "c", KEY, partitions=1)
    assert read_has_reply(has_reply(True, KeptSpan(subject, 3))) == (True, KeptSpan(subject, 3))
    assert read_has_reply(has_reply(True)) == (True, None)
    assert read_has_reply(has_reply(True, KeptSpan(None, 3))) == (True, None)  # two subjects
    assert read_has_reply(b'{"has": false}') == (False, None)
    assert read_has_reply(b'{"has": true, "subject": "s", "first_seq": true}') == (True, None)
    assert orjson.loads(error_reply(BadParams("no")))["error"]["code"] == 400


def test_a_gateways_permissions_name_only_itself() -> None:
    perms = gateway_permissions("gw-a")
    subscribe = perms["subscribe"]["allow"]
    assert subscribe == [gateway_frames("gw-a"), "_INBOX.gw-a.>"]
    everything = " ".join(subscribe + perms["publish"]["allow"])
    assert "gw-b" not in everything and ">" not in subscribe[0].replace(".gw-a.>", "")
    # Never the job queue's consumers, the request bucket's reads, or JetStream's consumer API.
    for forbidden in (
        "$JS.API.CONSUMER",
        "$KV.tw_requests.>",
        "tw.jobs.>",
        "$JS.API.STREAM.MSG.GET.TW_",
    ):
        assert not any(p.startswith(forbidden) for p in perms["publish"]["allow"]), forbidden
    users = authorization(["gw-a", "gw-b"])["authorization"]["users"]
    assert [u["user"] for u in users] == ["gw-a", "gw-b", "worker"]
