"""Every NATS subject, stream, bucket and consumer name tokenwire uses, in one place.

Layout::

    tw.jobs.chat                     chat jobs (stream TW_JOBS, work queue)
    tw.frames.<p>.<gateway>.<conn>.<key>
                                     every frame of request <key>, addressed to connection <conn>
                                     of gateway process <gateway>; <p> is the key's partition
                                     (stream TW_FRAMES_<p>, partition 0 TW_FRAMES, keeps them
                                     for resume)
    tw.live.<p>.<gateway>.<conn>.<key>
                                     the same frames as their partition's stream stored them,
                                     republished by the stream in its order with their stream
                                     sequences (headers): the gateway reads its connections'
                                     frames live with one wildcard subscription,
                                     tw.live.*.<gateway>.> (a frame the stream refused, such as
                                     a stale fence, never appears here)
    tw.ctl.stop.<key>                stop request <key> (every worker listens; the owner acts)
    tw.ctl.input                     a human's answer to the form a request waits on
                                     (request/reply, queue group ``tw-input``)
    tw.jobs.continue                 a run put back after its form was answered (or stopped
                                     while it waited): follow what Dify continues
    tw.dead.chat                     jobs that exhausted their attempts (stream TW_DEAD)
    tw.calls                         ``call`` requests (core request/reply, queue group
                                     ``tw-calls``: one worker answers each)
    tw.uploads                       "upload this staged file to Dify" (request/reply, the same
                                     queue group)
    tw.ctl.replay                    a restricted gateway's "create this replay consumer" / "are
                                     frames kept" (request/reply, the same queue group; checked
                                     by shared/replay_proxy.py)
    _INBOX.<process>.…               each process's replies (its own inbox prefix, so a gateway
                                     may be allowed its own inbox only)
    tw.upload.<upload id>            a staged upload's chunks (stream TW_UPLOADS, short-lived)

KV buckets: ``tw_requests`` (per-request facts, keys below), ``tw_connections`` (who holds
which of a user's connection slots, cluster-wide: key ``<user hash>.<slot>``) and ``tw_rates``
(each user's request token bucket: key ``<user hash>``; calls: ``<user hash>.call``) and
``tw_owners`` (who owns each run, task, form and file tokenwire created, where Dify does not
scope them: key ``<kind>.<id>``). Keys of ``tw_requests``::

    <key>.stop                       a gateway recorded that the request must stop
    <key>.dify                       the ids Dify gave the request (task, message, conversation)
    <key>.lease                      the delivery that owns the request (set on redelivery)
    <key>.job                        the job's state for operators (``tokenwire jobs``)
    <key>.pause                      a run waiting for a human: its form (and form token,
                                     never sent to a client), the job, how often it continued

``tw_app_slots``: an app's cluster-wide stream slots (``max_active``), key ``<app>.<slot>``.

``<key>`` is :func:`request_key`: a hash of (user, client id), so ids chosen by clients never
reach a subject, two users' ids never collide, and only the same user can name a request again
(resume, stop).

Frame subjects name their gateway so that one gateway can be allowed ``tw.frames.*.<gateway>.>``
and nothing of another's (NATS permissions per gateway), and so that the gateway needs one
subscription however many connections it holds. They lead with the partition,
:func:`frame_partition` (a stable hash of ``<key>`` modulo ``TOKENWIRE_FRAME_PARTITIONS``), so
that each partition's stream captures ``tw.frames.<p>.>`` and every reader finds a request's
frames from its key alone: a ``resume`` on another gateway, a worker recovering the request.
``<gateway>`` is :func:`new_gateway_id` per process start, or ``TOKENWIRE_GATEWAY_ID``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import NamedTuple

__all__ = [
    "APP_SLOTS_BUCKET",
    "CALLS_QUEUE",
    "CALLS_SUBJECT",
    "CONNECTIONS_BUCKET",
    "CONTROL_STOP_ALL",
    "DEAD_ALL",
    "DEAD_CHAT",
    "DEAD_STREAM",
    "FRAMES_STREAM",
    "INPUT_QUEUE",
    "INPUT_SUBJECT",
    "JOBS_ALL",
    "JOBS_STREAM",
    "JOB_CHAT",
    "JOB_CONSUMER",
    "JOB_CONTINUE",
    "OWNERS_BUCKET",
    "RATES_BUCKET",
    "REPLAY_SUBJECT",
    "REQUESTS_BUCKET",
    "SUBJECT_TOKEN",
    "UPLOADS_ALL",
    "UPLOADS_STREAM",
    "UPLOADS_SUBJECT",
    "FrameAddress",
    "KeptSpan",
    "app_slot_key",
    "call_rate_key",
    "connection_slot_key",
    "frame_address",
    "frame_partition",
    "frames_stream",
    "frames_stream_of",
    "gateway_frames",
    "gateway_liveness_key",
    "gateway_stamped_frames",
    "ids_key",
    "inbox_prefix",
    "lease_key",
    "new_connection_id",
    "new_gateway_id",
    "owner_key",
    "partition_frames",
    "partition_live",
    "pause_key",
    "rate_key",
    "request_frames",
    "request_frames_any_connection",
    "request_key",
    "slot_owner",
    "status_key",
    "stop_flag_key",
    "stop_subject",
    "upload_chunks",
]

JOBS_STREAM = "TW_JOBS"
JOBS_ALL = "tw.jobs.>"
JOB_CHAT = "tw.jobs.chat"
JOB_CONSUMER = "tw-workers"

DEAD_STREAM = "TW_DEAD"
DEAD_ALL = "tw.dead.>"
DEAD_CHAT = "tw.dead.chat"

#: The stream of frame partition 0 (the others: ``TW_FRAMES_<p>``, :func:`frames_stream`).
FRAMES_STREAM = "TW_FRAMES"
_FRAMES_PREFIX = "tw.frames."
#: Where a frames stream republishes what it stored (``tw.frames.X`` → ``tw.live.X``).
_LIVE_PREFIX = "tw.live."
#: One subject token as tokenwire's own ids are (a gateway id, a connection id).
SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")

CONTROL_STOP_ALL = "tw.ctl.stop.*"
INPUT_SUBJECT = "tw.ctl.input"
INPUT_QUEUE = "tw-input"
JOB_CONTINUE = "tw.jobs.continue"
APP_SLOTS_BUCKET = "tw_app_slots"

REQUESTS_BUCKET = "tw_requests"
CONNECTIONS_BUCKET = "tw_connections"
RATES_BUCKET = "tw_rates"
OWNERS_BUCKET = "tw_owners"

CALLS_SUBJECT = "tw.calls"
CALLS_QUEUE = "tw-calls"
UPLOADS_SUBJECT = "tw.uploads"
REPLAY_SUBJECT = "tw.ctl.replay"
UPLOADS_STREAM = "TW_UPLOADS"
UPLOADS_ALL = "tw.upload.>"


def request_key(user: str, request_id: str) -> str:
    """The subject-safe, user-scoped key of a request (also its JetStream ``Nats-Msg-Id``)."""
    digest = hashlib.blake2b(f"{user}\x00{request_id}".encode(), digest_size=16)
    return digest.hexdigest()


def new_connection_id() -> str:
    """A fresh, unguessable id for one WebSocket connection."""
    return secrets.token_hex(10)


def new_gateway_id() -> str:
    """A fresh id for one gateway process (when ``TOKENWIRE_GATEWAY_ID`` names none)."""
    return secrets.token_hex(6)


def slot_owner(gateway_id: str) -> str:
    """The name one gateway *process* writes into its connection slots and liveness entry:
    its gateway id and a fresh suffix per start. The id alone is not enough: a StatefulSet pod
    or ``--workers N`` children keep ``TOKENWIRE_GATEWAY_ID`` across restarts, and a process
    under its dead predecessor's name would count those slots as its own and keep them alive."""
    return f"{gateway_id}-{secrets.token_hex(4)}"


def frame_partition(key: str, partitions: int) -> int:
    """The partition of request ``key``'s frames: the same in every process and release
    (a digest, never Python's salted ``hash``), spread evenly over ``partitions``."""
    if partitions <= 1:
        return 0
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"tw-part").digest()
    return int.from_bytes(digest, "big") % partitions


def frames_stream(partition: int) -> str:
    """The stream that keeps partition ``partition``'s frames (0 keeps the name TW_FRAMES)."""
    return FRAMES_STREAM if partition == 0 else f"{FRAMES_STREAM}_{partition}"


def partition_frames(partition: int) -> str:
    """What the stream of partition ``partition`` captures."""
    return f"{_FRAMES_PREFIX}{partition}.>"


def partition_live(partition: int) -> str:
    """Where the stream of partition ``partition`` republishes what it stored."""
    return f"{_LIVE_PREFIX}{partition}.>"


def request_frames(gateway: str, conn: str, key: str, *, partitions: int) -> str:
    """Where a worker publishes the frames of request ``key`` of connection ``conn``, held by
    gateway process ``gateway`` (the job's reply subject)."""
    return f"{_FRAMES_PREFIX}{frame_partition(key, partitions)}.{gateway}.{conn}.{key}"


def gateway_frames(gateway: str) -> str:
    """What gateway process ``gateway`` subscribes to: the streams' republish of the frames of
    all its connections, in each stream's order (shared/sequencing.py: the one order all
    readers share)."""
    return f"{_LIVE_PREFIX}*.{gateway}.>"


def gateway_stamped_frames(gateway: str) -> str:
    """The frame subjects gateway ``gateway`` publishes to itself (the ``accepted`` it stamps on
    its own connections' requests): what its NATS permissions allow (tokenwire/natsperms.py)."""
    return f"{_FRAMES_PREFIX}*.{gateway}.>"


def request_frames_any_connection(key: str, *, partitions: int) -> str:
    """Filter for every kept frame of request ``key``, whatever gateway and connection asked it
    (resume), within the stream :func:`frames_stream` of its partition."""
    return f"{_FRAMES_PREFIX}{frame_partition(key, partitions)}.*.*.{key}"


class KeptSpan(NamedTuple):
    """Where one request's kept frames are: their ``subject`` (None when the first and the
    last are on two subjects) and the stream sequence of the first."""

    subject: str | None
    first_seq: int


class FrameAddress(NamedTuple):
    """The parts of a frame subject."""

    partition: int
    gateway: str
    conn: str
    key: str


def frame_address(subject: str) -> FrameAddress | None:
    """The parts of ``subject`` if it is a frame subject of this layout (as a worker publishes
    it, or as its stream republishes it), else None."""
    for prefix in (_FRAMES_PREFIX, _LIVE_PREFIX):
        if subject.startswith(prefix):
            break
    else:
        return None
    parts = subject[len(prefix) :].split(".")
    if len(parts) != 4 or not parts[0].isdigit() or not all(parts[1:]):
        return None
    return FrameAddress(int(parts[0]), parts[1], parts[2], parts[3])


def frames_stream_of(subject: str) -> str:
    """The stream that keeps ``subject``: its partition's, read from the subject itself, so
    a request asked before the partition count changed is still found where it was kept."""
    address = frame_address(subject)
    return frames_stream(address.partition if address is not None else 0)


def inbox_prefix(process: str) -> str:
    """The inbox prefix of one process (``process``: one subject token, its identity)."""
    return f"_INBOX.{process}"


def stop_subject(key: str) -> str:
    """Where a gateway announces that request ``key`` should stop."""
    return f"tw.ctl.stop.{key}"


def _user_hash(user: str) -> str:
    return hashlib.blake2b(user.encode(), digest_size=16, person=b"tw-user").hexdigest()


def connection_slot_key(user: str, slot: int) -> str:
    """KV key of one of ``user``'s connection slots (a user name never reaches NATS)."""
    return f"{_user_hash(user)}.{slot}"


def gateway_liveness_key(gateway: str) -> str:
    """KV key of a gateway's liveness entry in the connections bucket (not hex: never a
    user's slot)."""
    return f"gw.{gateway}"


def rate_key(user: str) -> str:
    """KV key of ``user``'s request token bucket."""
    return _user_hash(user)


def call_rate_key(user: str) -> str:
    """KV key of ``user``'s call token bucket (its own rate, the same bucket)."""
    return f"{_user_hash(user)}.call"


def owner_key(kind: str, id: str) -> str:
    """KV key of the owner of ``id`` of ``kind`` (run, task, form, file). ``id`` is one of
    Dify's ids (uuid-like) or checked by the caller to be letters, digits, ``-`` and ``_``."""
    return f"{kind}.{id}"


def upload_chunks(upload_id: str) -> str:
    """Where a gateway stages the chunks of one upload (``upload_id``: hex, its own)."""
    return f"tw.upload.{upload_id}"


def stop_flag_key(key: str) -> str:
    """The request-bucket key under which a gateway records that request ``key`` must stop."""
    return f"{key}.stop"


def ids_key(key: str) -> str:
    """The request-bucket key holding the ids Dify gave request ``key``."""
    return f"{key}.dify"


def lease_key(key: str) -> str:
    """The request-bucket key naming the delivery that owns request ``key``."""
    return f"{key}.lease"


def status_key(key: str) -> str:
    """The request-bucket key holding the job's state for operators (``tokenwire jobs``)."""
    return f"{key}.job"


def pause_key(key: str) -> str:
    """The request-bucket key of a run waiting for a human (its form token stays here)."""
    return f"{key}.pause"


def app_slot_key(app: str, slot: int) -> str:
    """KV key of one of ``app``'s cluster-wide stream slots (app names are ``[A-Za-z0-9_-]``)."""
    return f"{app}.{slot}"
