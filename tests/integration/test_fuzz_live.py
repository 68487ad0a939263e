"""Fuzzing a live connection: 100,000+ random and mutated frames, and real requests beside them.

The gateway reads one frame at a time, so the fuzz is sent in batches without waiting for
replies. Frames are seeded mutations of valid ones (byte flips, truncations, splices, type
swaps, deep nesting, huge numbers, invalid UTF-8, near-limit sizes) and purely random bytes.
Meanwhile real requests stream on the same connection; every one must end with exactly
Dify's answer and gapless seqs, the gateway must stay up, and the connection must stay open.

A second, hypothesis-driven test sends structured frame sequences over a synchronous client
and checks after each that the connection still answers a ``ping``.
"""

from __future__ import annotations

import json
import os
import random
import string
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect as sync_connect

from shared.exceptions import ClientError
from shared.frames import ChatFrame, ClientLimits, PingFrame, decode_client_frame
from tests.integration.stack import Stack, running_stack
from tests.integration.wsclient import Client, answer_of, assert_seq_complete
from tokenwire.simulator import expected_answer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FUZZ_FRAMES = 100_000
BATCH = 1_000
# Valid chats that happen to come out of the mutations do reach Dify: keep them few.
MAX_FUZZ_CHATS = 20
SEED = int(os.environ.get("TOKENWIRE_FUZZ_SEED", "20240601"))
REAL_PREFIX = "real-"  # no fuzz frame may name a real request (it would stop or resume it)
TOKENS = 40

GATEWAY_ENV = {
    # The fuzz is one client on purpose: lift the per-connection flood guard for it.
    "TOKENWIRE_FRAME_RATE": "1000000/s",
    "TOKENWIRE_FRAME_BURST": "1000000",
    "TOKENWIRE_RATE_PER_USER": "100/s",
    "TOKENWIRE_RATE_BURST": "100",
    # Every refused fuzz frame is answered; the client reads them as fast as it can.
    "TOKENWIRE_SEND_QUEUE_FRAMES": "250000",
}


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("fuzz")) as stack:
        stack.gateway(**GATEWAY_ENV)
        yield stack


# --- the corpus and the mutations ------------------------------------------------------------

SEEDS: list[dict[str, Any]] = [
    {"type": "chat", "id": "q1", "query": "Hello"},
    {
        "type": "chat",
        "id": "q2",
        "query": "Übersetze: 你好 👋",
        "conversation_id": "0b9f4c5e-8a8e-4a57-9d0b-2b3b1f7f4e10",
        "inputs": {"lang": "de", "n": 3, "nested": {"a": [1, 2, {"b": None}]}},
        "files": [{"type": "image", "transfer_method": "remote_url", "url": "https://x/y.png"}],
        "app": "sales",
    },
    {"type": "stop", "id": "q1"},
    {"type": "resume", "id": "q1", "after": 3},
    {"type": "ping"},
    {"type": "auth", "token": "a.b.c"},
]
WEIRD_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    2**63,
    -(2**70),
    1e308,
    "",
    " ",
    "\x00",
    "\u202e",
    "😀" * 50,
    "x" * 5000,
    [],
    {},
    [[[[[[[[[[[[]]]]]]]]]]]],
    {"type": "chat"},
    "chat",
    "stop",
    "resume",
    "ping",
    "auth",
]


def _deep(depth: int) -> Any:
    value: Any = "leaf"
    for n in range(depth):
        value = {"k": value} if n % 2 else [value]
    return value


def _mutate_obj(rng: random.Random, obj: dict[str, Any]) -> Any:
    obj = dict(obj)
    op = rng.randrange(7)
    keys = list(obj) or ["type"]
    if op == 0:
        obj.pop(rng.choice(keys), None)
    elif op == 1:
        obj[rng.choice(keys)] = rng.choice(WEIRD_VALUES)
    elif op == 2:
        obj[rng.choice(["type", "id", "query", "after", "inputs", "files", "x" * 3])] = _deep(
            rng.randrange(1, 40)
        )
    elif op == 3:
        obj["type"] = rng.choice(["chat", "stop", "resume", "ping", "auth", "CHAT", "", "hello"])
    elif op == 4:
        obj["inputs"] = {str(i): rng.choice(WEIRD_VALUES) for i in range(rng.randrange(1, 50))}
    elif op == 5:
        obj["files"] = [
            {"type": rng.choice(["image", "evil"]), "transfer_method": "remote_url"}
        ] * rng.randrange(0, 30)
    else:
        return rng.choice([[obj], obj.get("type"), rng.random(), None])
    return obj


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[pos % len(buf)] = rng.randrange(256)
        elif op == 1:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
        elif op == 2:
            del buf[pos : pos + rng.randrange(1, 10)]
        elif op == 3:
            buf = buf[:pos]
        elif op == 4:
            buf[pos:pos] = rng.choice([b"{", b"}", b"[", b'"', b"\\", b":", b",", b"\\u"])
        else:
            buf = buf + buf[: rng.randrange(len(buf) + 1)]
    return bytes(buf)


def fuzz_frame(rng: random.Random) -> str | bytes:
    """One fuzz frame; text when it is valid UTF-8 (as browsers send), else binary."""
    kind = rng.random()
    seed = rng.choice(SEEDS)
    if kind < 0.45:
        # The standard encoder: big integers, NaN and deep nesting are part of the fuzz.
        raw = json.dumps(_mutate_obj(rng, seed), ensure_ascii=rng.random() < 0.5).encode()
    elif kind < 0.85:
        raw = _mutate_bytes(rng, orjson.dumps(seed))
    elif kind < 0.95:
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    elif kind < 0.99:
        raw = "".join(rng.choice(string.printable) for _ in range(rng.randrange(0, 300))).encode()
    else:  # around the 64 KiB frame limit (far below the 1009 close at 256 KiB)
        raw = orjson.dumps(seed | {"query": "y" * rng.randrange(60_000, 70_000)})
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw


def fuzz_corpus(count: int, seed: int) -> list[str | bytes]:
    rng = random.Random(seed)
    limits = ClientLimits()
    frames: list[str | bytes] = []
    chats = 0
    while len(frames) < count:
        frame = fuzz_frame(rng)
        text = frame if isinstance(frame, str) else frame.decode(errors="replace")
        if REAL_PREFIX in text:
            continue
        try:
            decoded = decode_client_frame(frame, limits)
        except ClientError:
            decoded = None
        if isinstance(decoded, ChatFrame):
            if chats >= MAX_FUZZ_CHATS:
                continue
            chats += 1
        frames.append(frame)
    return frames


# --- the tests --------------------------------------------------------------------------------


async def test_100k_fuzz_frames_beside_real_requests(fuzz_stack: Stack) -> None:
    corpus = fuzz_corpus(FUZZ_FRAMES, SEED)
    gateway = fuzz_stack.procs[-1]
    real: dict[str, str] = {}

    async def ask(client: Client, n: int) -> None:
        rid = f"{REAL_PREFIX}{n}-{uuid.uuid4().hex[:6]}"
        real[rid] = f"real question {n} {uuid.uuid4().hex[:6]}"
        await client.chat(real[rid], rid=rid, inputs={"tw_sim": {"delay_ms": 20}})

    async with Client(fuzz_stack.ws_url(user="fuzzer")) as client:
        await ask(client, 0)
        for start in range(0, len(corpus), BATCH):
            for frame in corpus[start : start + BATCH]:
                await client.send(frame)
            if start % (BATCH * 10) == 0:
                await ask(client, start // BATCH + 1)
        await ask(client, -1)  # read after every fuzz frame: the reader is sequential
        results = {rid: await client.finish(rid, timeout=90) for rid in real}
        assert not client.closed.is_set(), f"closed with {client.close_code}"
        await client.send({"type": "ping"})
        while (await client.next_other(timeout=60))["type"] != "pong":
            pass

    for rid, frames in results.items():
        assert frames[-1]["type"] == "end", (rid, frames[-1])
        assert_seq_complete(frames)
        assert answer_of(frames) == expected_answer(real[rid], TOKENS), rid
    refused = [f for f in client.other if f["type"] == "error"]
    assert len(refused) > FUZZ_FRAMES // 2  # most of the fuzz was refused, frame by frame
    assert {f["code"] for f in refused} >= {"bad_json", "unknown_type", "invalid_frame"}
    assert gateway.alive
    port = fuzz_stack.gateway_ports[0]
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
client_frames = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["chat", "stop", "resume", "ping", "auth", "nope"])},
        optional={
            "id": st.one_of(st.text(max_size=140), json_values),
            "query": st.one_of(st.text(max_size=50), json_values),
            "after": st.one_of(st.integers(), json_values),
            "inputs": json_values,
            "files": json_values,
            "conversation_id": st.one_of(st.uuids().map(str), json_values),
            "token": json_values,
        },
    ).map(json.dumps),
    st.binary(max_size=100),
    st.text(max_size=100),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(frames=st.lists(client_frames, min_size=1, max_size=40))
def test_hypothesis_frame_sequences_never_break_the_connection(
    fuzz_stack: Stack, frames: list[str | bytes]
) -> None:
    # Valid chats would each ask Dify: the live test above covers them.
    frames = [f for f in frames if not isinstance(_decoded(f), ChatFrame)]
    pings = sum(isinstance(_decoded(f), PingFrame) for f in frames)
    with sync_connect(fuzz_stack.ws_url(user="hypothesis"), subprotocols=["tokenwire.v1"]) as ws:  # type: ignore[list-item]
        assert orjson.loads(ws.recv(timeout=10))["type"] == "hello"
        for frame in frames:
            ws.send(frame)
        ws.send('{"type":"ping"}')
        pongs = 0
        while pongs <= pings:  # every frame before the last ping was read and answered
            reply = orjson.loads(ws.recv(timeout=30))
            assert reply["type"] in ("pong", "error"), reply
            pongs += reply["type"] == "pong"


def _decoded(frame: str | bytes) -> object:
    try:
        return decode_client_frame(frame, ClientLimits())
    except ClientError:
        return None


def test_the_gateway_survived(fuzz_stack: Stack) -> None:
    assert fuzz_stack.procs[-1].alive
    port = fuzz_stack.gateway_ports[0]
    assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
