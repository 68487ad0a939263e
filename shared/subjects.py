"""Every NATS subject, stream, bucket and consumer name tokenwire uses, in one place.

Layout::

    tw.jobs.chat                     chat jobs (stream TW_JOBS, work queue)
    tw.frames.<conn>.<key>           every frame of request <key>, addressed to connection <conn>
                                     (stream TW_FRAMES keeps them for resume)
    tw.live.<conn>.<key>             the same frames as TW_FRAMES stored them, republished by the
                                     stream in its order with their stream sequences (headers):
                                     the owning gateway reads them live with one core
                                     subscription per connection (a frame the stream refused,
                                     such as a stale fence, never appears here)
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
"""

from __future__ import annotations

import hashlib
import secrets

__all__ = [
    "APP_SLOTS_BUCKET",
    "CALLS_QUEUE",
    "CALLS_SUBJECT",
    "CONNECTIONS_BUCKET",
    "CONTROL_STOP_ALL",
    "DEAD_ALL",
    "DEAD_CHAT",
    "DEAD_STREAM",
    "FRAMES_ALL",
    "FRAMES_STREAM",
    "INPUT_QUEUE",
    "INPUT_SUBJECT",
    "JOBS_ALL",
    "JOBS_STREAM",
    "JOB_CHAT",
    "JOB_CONSUMER",
    "JOB_CONTINUE",
    "LIVE_ALL",
    "OWNERS_BUCKET",
    "RATES_BUCKET",
    "REQUESTS_BUCKET",
    "UPLOADS_ALL",
    "UPLOADS_STREAM",
    "UPLOADS_SUBJECT",
    "app_slot_key",
    "call_rate_key",
    "connection_frames",
    "connection_slot_key",
    "gateway_liveness_key",
    "ids_key",
    "lease_key",
    "new_connection_id",
    "owner_key",
    "pause_key",
    "rate_key",
    "request_frames",
    "request_frames_any_connection",
    "request_key",
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

FRAMES_STREAM = "TW_FRAMES"
FRAMES_ALL = "tw.frames.>"
#: Where TW_FRAMES republishes what it stored (``tw.frames.X`` → ``tw.live.X``).
LIVE_ALL = "tw.live.>"

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
UPLOADS_STREAM = "TW_UPLOADS"
UPLOADS_ALL = "tw.upload.>"


def request_key(user: str, request_id: str) -> str:
    """The subject-safe, user-scoped key of a request (also its JetStream ``Nats-Msg-Id``)."""
    digest = hashlib.blake2b(f"{user}\x00{request_id}".encode(), digest_size=16)
    return digest.hexdigest()


def new_connection_id() -> str:
    """A fresh, unguessable id for one WebSocket connection."""
    return secrets.token_hex(10)


def connection_frames(conn: str) -> str:
    """What the owning gateway subscribes to for one connection: the stream's republish of
    its frames, in the stream's order (shared/sequencing.py: the one order all readers share)."""
    return f"tw.live.{conn}.*"


def request_frames(conn: str, key: str) -> str:
    """Where a worker publishes the frames of request ``key`` of connection ``conn``."""
    return f"tw.frames.{conn}.{key}"


def request_frames_any_connection(key: str) -> str:
    """Filter for every kept frame of request ``key``, whatever connection asked it (resume)."""
    return f"tw.frames.*.{key}"


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
