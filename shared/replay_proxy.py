"""Reading kept frames for a gateway that may not read JetStream itself (restricted NATS).

Why: a gateway given the restricted permissions of docs/security.md ("NATS permissions") may
subscribe only to its own frames. It still has to replay a request's kept frames for
``resume`` on any gateway, and JetStream's consumer API cannot be limited by permissions to "one
request's frames": the filter subject of a consumer request may hold wildcards, and a
permission cannot tell a literal ``*`` from a wildcard. So a restricted gateway asks a worker
(NATS request to ``tw.ctl.replay``, the workers' queue group) to create the consumer for it,
and the worker creates only what this module allows:

* a consumer of one frames stream, filtered to exactly one request's frames: the filter is
  :func:`shared.subjects.request_frames_any_connection` of a literal request key (32 hex
  digits), or :func:`shared.subjects.request_frames` of that key with a literal gateway and
  connection (plain subject tokens, never a wildcard: narrower still, and far cheaper for
  nats-server to serve), in the stream that holds that key;
* pushed to an inbox (``_INBOX.…``), never onto another subject tokenwire uses;
* with the ordered-consumer settings (no acks, one delivery, flow control, memory storage,
  one replica) and an inactivity threshold, so a gateway that dies leaves nothing behind.

Everything else in the request is dropped, not passed on. The answer is JetStream's own
response, unchanged, so the gateway's nats-py ordered consumer reads it as if it had asked
JetStream directly (and re-asks the same way when it recreates its consumer after a gap).
``has`` answers whether any frame of a request is kept (resume of a known id) and, when all are
on one subject, that subject and the first frame's sequence: the replay that follows filters on
it (a gateway without them, or an older worker's answer, keeps the wildcard).

Pure code: the worker's shell (``worker/replay_proxy.py``) does the I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import orjson

from shared.exceptions import BadParams
from shared.subjects import (
    SUBJECT_TOKEN,
    KeptSpan,
    frame_address,
    frame_partition,
    frames_stream,
    request_frames,
    request_frames_any_connection,
)

__all__ = [
    "INACTIVE_THRESHOLD_NS",
    "ConsumerAsk",
    "HasAsk",
    "check_consumer",
    "create_subject",
    "decode_ask",
    "encode_consumer_ask",
    "encode_has_ask",
    "error_reply",
    "has_reply",
    "key_stream",
    "read_has_reply",
]

#: How long a replay consumer lives with nobody listening (its gateway died): 30 s.
INACTIVE_THRESHOLD_NS: Final = 30 * 1_000_000_000

_KEY = re.compile(r"[0-9a-f]{32}")
_INBOX = re.compile(r"_INBOX\.[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DELIVER_POLICIES: Final = frozenset({"all", "by_start_sequence"})


@dataclass(frozen=True, slots=True)
class ConsumerAsk:
    """Create a replay consumer: the stream and the config nats-py built (``as_dict()``)."""

    stream: str
    config: dict[str, Any]


@dataclass(frozen=True, slots=True)
class HasAsk:
    """Is any frame of request ``key`` kept?"""

    key: str


def encode_consumer_ask(stream: str, config: dict[str, Any]) -> bytes:
    return orjson.dumps({"op": "consumer", "stream": stream, "config": config})


def encode_has_ask(key: str) -> bytes:
    return orjson.dumps({"op": "has", "key": key})


def decode_ask(data: bytes) -> ConsumerAsk | HasAsk:
    """The request a gateway sent; :class:`BadParams` for anything else."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadParams("a replay request must be JSON") from exc
    if not isinstance(body, dict):
        raise BadParams("a replay request must be an object")
    op = body.get("op")
    if op == "has":
        key = body.get("key")
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise BadParams("'key' must be a request key")
        return HasAsk(key)
    if op == "consumer":
        stream, config = body.get("stream"), body.get("config")
        if not isinstance(stream, str) or not isinstance(config, dict):
            raise BadParams("'stream' and 'config' are required")
        return ConsumerAsk(stream, config)
    raise BadParams("'op' must be 'consumer' or 'has'")


def key_stream(key: str, partitions: int) -> str:
    """The frames stream that keeps request ``key``'s frames."""
    return frames_stream(frame_partition(key, partitions))


def check_consumer(ask: ConsumerAsk, partitions: int) -> dict[str, Any]:
    """The consumer config a worker may create for ``ask`` (``partitions``: the frame store's
    partition count), or :class:`BadParams` saying why not."""
    config = ask.config
    filter_subject = config.get("filter_subject")
    if not isinstance(filter_subject, str):
        raise BadParams("a replay consumer needs a filter subject")
    key = filter_subject.rsplit(".", 1)[-1]
    if not _KEY.fullmatch(key) or not _one_requests(filter_subject, key, partitions):
        raise BadParams("a replay consumer may only read one request's frames")
    if ask.stream != key_stream(key, partitions):
        raise BadParams("that request's frames are not kept in that stream")
    deliver = config.get("deliver_subject")
    if not isinstance(deliver, str) or not _INBOX.fullmatch(deliver):
        raise BadParams("a replay consumer must deliver to an inbox")
    policy = config.get("deliver_policy", "all")
    if policy not in _DELIVER_POLICIES:
        raise BadParams("a replay consumer starts at the first frame or at a sequence")
    allowed: dict[str, Any] = {
        "deliver_subject": deliver,
        "deliver_policy": policy,
        "filter_subject": filter_subject,
        "ack_policy": "none",
        "max_deliver": 1,
        "flow_control": True,
        "mem_storage": True,
        "num_replicas": 1,
        "replay_policy": "instant",
        "inactive_threshold": INACTIVE_THRESHOLD_NS,
    }
    if policy == "by_start_sequence":
        start = config.get("opt_start_seq")
        if not isinstance(start, int) or isinstance(start, bool) or start < 1:
            raise BadParams("'opt_start_seq' must be a positive sequence")
        allowed["opt_start_seq"] = start
    heartbeat = config.get("idle_heartbeat")
    if isinstance(heartbeat, int) and not isinstance(heartbeat, bool) and heartbeat > 0:
        allowed["idle_heartbeat"] = min(heartbeat, 30 * 1_000_000_000)
    name = config.get("name")
    if name is not None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise BadParams("a replay consumer's name must be a plain token")
        allowed["name"] = name
    return allowed


def _one_requests(filter_subject: str, key: str, partitions: int) -> bool:
    """Whether ``filter_subject`` reads request ``key``'s frames and nothing else: on any
    connection (the wildcard), or on one literal gateway and connection."""
    if filter_subject == request_frames_any_connection(key, partitions=partitions):
        return True
    address = frame_address(filter_subject)
    return (
        address is not None
        and SUBJECT_TOKEN.fullmatch(address.gateway) is not None
        and SUBJECT_TOKEN.fullmatch(address.conn) is not None
        and filter_subject
        == request_frames(address.gateway, address.conn, key, partitions=partitions)
    )


def create_subject(stream: str, config: dict[str, Any], prefix: str = "$JS.API") -> str:
    """JetStream's API subject that creates ``config`` (named: with its filter, as nats-py)."""
    name = config.get("name")
    if name:
        return f"{prefix}.CONSUMER.CREATE.{stream}.{name}.{config['filter_subject']}"
    return f"{prefix}.CONSUMER.CREATE.{stream}"


def has_reply(has: bool, span: KeptSpan | None = None) -> bytes:
    """The ``has`` answer, with where the frames are when they are on one subject."""
    if span is None or span.subject is None:
        return orjson.dumps({"has": has})
    return orjson.dumps({"has": has, "subject": span.subject, "first_seq": span.first_seq})


def error_reply(exc: Exception) -> bytes:
    """A refusal in JetStream's own error shape, so nats-py raises it as an API error."""
    return orjson.dumps({"error": {"code": 400, "err_code": 10000, "description": str(exc)}})


def read_has_reply(data: bytes) -> tuple[bool, KeptSpan | None]:
    """The worker's ``has`` answer, and where the frames are when it says (a worker before
    this field did not); a refusal raises :class:`BadParams` with its reason."""
    body = orjson.loads(data)
    if isinstance(body, dict) and isinstance(body.get("has"), bool):
        subject, first_seq = body.get("subject"), body.get("first_seq")
        at = None
        if (
            body["has"]
            and isinstance(subject, str)
            and isinstance(first_seq, int)
            and not isinstance(first_seq, bool)
            and first_seq > 0
        ):
            at = KeptSpan(subject, first_seq)
        return bool(body["has"]), at
    error = body.get("error") if isinstance(body, dict) else None
    reason = error.get("description") if isinstance(error, dict) else None
    raise BadParams(str(reason or f"unexpected replay answer: {body!r}")[:200])
