"""The one place tokenwire touches nats-py: connect, declare the topology, translate errors.

The gateway (``gateway/bus.py``), the worker (``worker/bus.py``, ``worker/app.py``) and
``tokenwire jobs`` (``tokenwire/jobs.py``) all go through this module, the way ``worker/dify.py``
is the one place httpx is touched:

* :func:`map_nats_errors` turns every nats-py error into tokenwire's, once: a call that got no
  answer yet (no responders, no stream response, a timeout: a JetStream leader election) is
  :class:`~shared.exceptions.BusRetryable`, anything else
  :class:`~shared.exceptions.BusUnavailable`. Nothing outside this module catches a
  ``nats.*`` type.
* :func:`connect` and :func:`nats_servers` read ``TOKENWIRE_NATS_URL`` the same way everywhere;
  :func:`ensure_topology` and :func:`ensure_bucket` declare what ``shared/topology.py``
  describes as data.
* The few JetStream and KV calls whose "not found" or "lost a compare-and-set" is an answer,
  not a failure, return ``None`` (or ``False``) for it: :func:`kv_get`, :func:`kv_create`,
  :func:`kv_update`, :func:`kv_delete`, :func:`open_bucket`, :func:`stream_state`,
  :func:`subject_count`, :func:`read_subject`, :func:`kept_span`, :func:`get_message`,
  :func:`delivered_upto`, :func:`consumer_lag`.

It does I/O, so it is not part of the checked core (tests/unit/test_core_boundary.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final, NamedTuple

import nats
import nats.errors
import nats.js.errors
from faststream.nats.security import (
    NatsCredentials,
    NatsNKey,
    NatsSecurity,
    NatsToken,
    NatsUserPassword,
)
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import (
    DeliverPolicy,
    KeyValueConfig,
    RawStreamMsg,
    RePublish,
    StreamConfig,
    StreamState,
)
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from shared.exceptions import BusFull, BusRetryable, BusUnavailable
from shared.settings import Settings
from shared.subjects import KeptSpan, inbox_prefix
from shared.topology import request_bucket_config, stream_configs

__all__ = [
    "RECONNECT_FOREVER",
    "KvEntry",
    "broker_security",
    "connect",
    "consumer_lag",
    "credentials",
    "declare_streams",
    "delivered_upto",
    "dropped_subject",
    "ensure_bucket",
    "ensure_stream",
    "ensure_topology",
    "get_message",
    "kept_span",
    "kv_beat",
    "kv_create",
    "kv_delete",
    "kv_get",
    "kv_put",
    "kv_update",
    "map_nats_errors",
    "nats_servers",
    "open_bucket",
    "publish_acked",
    "publish_expecting",
    "purge_subject",
    "read_subject",
    "read_subject_seqs",
    "respond",
    "stream_state",
    "stream_usage",
    "subject_count",
    "subscribe",
    "tls_context",
]

#: How the long-lived processes reconnect: forever, once a second.
RECONNECT_FOREVER: Final[dict[str, Any]] = {"max_reconnect_attempts": -1, "reconnect_time_wait": 1}

# No answer yet: no stream leader (no responders, no stream response) or an ack lost to the
# election. The same call soon may succeed.
_NO_ANSWER = (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError)
# JetStream's "wrong last sequence" error codes (a compare-and-set lost).
_WRONG_LAST_SEQUENCE = (10071, 10164)
# JetStream's "insufficient storage", "maximum messages exceeded", "maximum bytes exceeded".
_STORAGE_FULL = frozenset({10047, 10076, 10077})
# How long reading a subject's kept messages may take.
_READ_ALL_S = 10.0


@contextlib.contextmanager
def map_nats_errors(what: str) -> Iterator[None]:
    """Translate nats-py's errors into :class:`BusRetryable` or :class:`BusUnavailable`."""
    try:
        yield
    except TimeoutError as exc:  # nats.errors.TimeoutError is one too
        raise BusRetryable(
            f"cannot {what}: NATS did not answer in time ({type(exc).__name__})", maybe_done=True
        ) from exc
    except _NO_ANSWER as exc:
        raise BusRetryable(f"cannot {what}: NATS has no answer yet ({type(exc).__name__})") from exc
    except nats.js.errors.APIError as exc:
        # Not every APIError ran APIError.__init__: nats-py's key-value errors (KeyNotFoundError,
        # KeyDeletedError, ...) set their own fields, so a missing err_code must not turn a
        # refusal into an AttributeError (it did, in a slot claim under NATS overload).
        detail = getattr(exc, "description", None) or str(exc)
        if getattr(exc, "err_code", None) in _STORAGE_FULL:
            raise BusFull(f"cannot {what}: storage is full ({detail})") from exc
        raise BusUnavailable(f"cannot {what}: NATS refused ({detail})") from exc
    except nats.errors.Error as exc:
        raise BusUnavailable(f"cannot {what}: NATS is unavailable ({type(exc).__name__})") from exc


def nats_servers(settings: Settings) -> list[str]:
    """The server URLs of ``TOKENWIRE_NATS_URL`` (comma-separated)."""
    return [url.strip() for url in settings.nats_url.split(",") if url.strip()]


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for NATS: the system's CAs or ``TOKENWIRE_NATS_TLS_CA_FILE``, plus the
    client certificate when one is set. None when nothing asks for TLS (a ``tls://`` URL
    alone gets nats-py's default context)."""
    if settings.nats_tls_ca_file is None and settings.nats_tls_cert_file is None:
        return None
    context = ssl.create_default_context(
        cafile=str(settings.nats_tls_ca_file) if settings.nats_tls_ca_file else None
    )
    if settings.nats_tls_cert_file is not None and settings.nats_tls_key_file is not None:
        context.load_cert_chain(str(settings.nats_tls_cert_file), str(settings.nats_tls_key_file))
    return context


def credentials(settings: Settings) -> dict[str, Any]:
    """nats-py's ``connect`` options for the one credential the settings give (and TLS)."""
    options: dict[str, Any] = {}
    if settings.nats_user is not None and settings.nats_password is not None:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password.get_secret_value()
    if settings.nats_token is not None:
        options["token"] = settings.nats_token.get_secret_value()
    if settings.nats_nkey_seed_file is not None:
        options["nkeys_seed"] = str(settings.nats_nkey_seed_file)
    if settings.nats_creds_file is not None:
        options["user_credentials"] = str(settings.nats_creds_file)
    context = tls_context(settings)
    if context is not None:
        options["tls"] = context
    return options


def broker_security(settings: Settings) -> NatsSecurity | None:
    """The same credentials and TLS for FastStream's broker (the worker), which takes them
    as one ``security`` object."""
    tls = tls_context(settings)
    if settings.nats_user is not None and settings.nats_password is not None:
        return NatsUserPassword(
            settings.nats_user, settings.nats_password.get_secret_value(), ssl_context=tls
        )
    if settings.nats_token is not None:
        return NatsToken(settings.nats_token.get_secret_value(), ssl_context=tls)
    if settings.nats_nkey_seed_file is not None:
        return NatsNKey(settings.nats_nkey_seed_file, ssl_context=tls)
    if settings.nats_creds_file is not None:
        return NatsCredentials(str(settings.nats_creds_file), ssl_context=tls)
    return NatsSecurity(ssl_context=tls) if tls is not None else None


async def connect(
    settings: Settings, *, name: str, process: str | None = None, **options: Any
) -> Client:
    """One NATS connection named ``name`` (callbacks and reconnect options as nats-py's),
    with the credentials and TLS of the settings. With ``process`` (one subject token: the
    process's identity) its replies arrive under its own inbox prefix, so NATS permissions can
    allow a process its own replies and nobody else's."""
    if process is not None:
        options["inbox_prefix"] = inbox_prefix(process)
    with map_nats_errors("connect to NATS"):
        client: Client = await nats.connect(
            nats_servers(settings), name=name, **credentials(settings), **options
        )
    return client


# --- topology -----------------------------------------------------------------------------


async def declare_streams(js: JetStreamContext, settings: Settings) -> None:
    """Create every stream of ``shared/topology.py``, or update it to the current settings."""
    for spec in stream_configs(settings):
        config = _stream_config(spec)
        with map_nats_errors("declare the streams"):
            try:
                await js.add_stream(config=config)
            except nats.js.errors.BadRequestError:
                await js.update_stream(config=config)


async def ensure_stream(js: JetStreamContext, spec: dict[str, Any]) -> None:
    """Create one stream of ``shared/topology.py`` (or update it to ``spec``)."""
    config = _stream_config(spec)
    with map_nats_errors("declare a stream"):
        try:
            await js.add_stream(config=config)
        except nats.js.errors.BadRequestError:
            await js.update_stream(config=config)


def _stream_config(spec: dict[str, Any]) -> StreamConfig:
    republish = spec.get("republish")
    if isinstance(republish, dict):
        spec = spec | {"republish": RePublish(**republish)}
    return StreamConfig(**spec)


async def ensure_topology(js: JetStreamContext, settings: Settings) -> KeyValue:
    """Every stream and the request bucket (both processes declare them at start)."""
    await declare_streams(js, settings)
    with map_nats_errors("declare the request bucket"):
        return await js.create_key_value(config=KeyValueConfig(**request_bucket_config(settings)))


async def ensure_bucket(js: JetStreamContext, spec: dict[str, Any]) -> tuple[KeyValue, bool]:
    """Create a KV bucket, or bring an existing one's TTL to ``spec``'s (the last start wins).

    ``spec["msg_ttl"]`` (optional, True): the bucket also allows a TTL per entry
    (:func:`kv_beat`; nats-server 2.11+), switched on in an existing bucket too.
    Returns the bucket and whether an existing one's TTL was updated.
    """
    spec = dict(spec)
    msg_ttl = bool(spec.pop("msg_ttl", False))
    with map_nats_errors("declare a bucket"):
        try:
            kv = await js.create_key_value(config=KeyValueConfig(**spec))
            updated = False
        except nats.js.errors.BadRequestError:
            kv, updated = None, True
        info = await js.stream_info(f"KV_{spec['bucket']}")
        config = info.config
        if updated or (msg_ttl and not config.allow_msg_ttl):
            config.max_age = spec["ttl"]
            config.duplicate_window = min(config.duplicate_window or spec["ttl"], spec["ttl"])
            if msg_ttl:
                config.allow_msg_ttl = True
            await js.update_stream(config=config)
        return kv or await js.key_value(spec["bucket"]), updated


async def open_bucket(js: JetStreamContext, name: str) -> KeyValue | None:
    """The bucket ``name``, or None if nobody declared it yet."""
    with map_nats_errors("open a bucket"):
        try:
            return await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            return None


# --- KV -----------------------------------------------------------------------------------


class KvEntry(NamedTuple):
    value: bytes
    revision: int


async def kv_get(kv: KeyValue, key: str) -> KvEntry | None:
    """The entry, or None when the key is absent, deleted or expired."""
    with map_nats_errors("read a key"):
        try:
            entry = await kv.get(key)
        except nats.js.errors.NotFoundError:  # KeyNotFoundError, KeyDeletedError
            return None
    return KvEntry(entry.value or b"", entry.revision or 0)


async def kv_put(kv: KeyValue, key: str, value: bytes) -> int:
    """Write ``key`` whatever it holds; its new revision."""
    with map_nats_errors("write a key"):
        revision: int = await kv.put(key, value)
    return revision


async def kv_beat(js: JetStreamContext, bucket: str, key: str, value: bytes, ttl_s: float) -> None:
    """Write ``key`` whatever it holds, to expire ``ttl_s`` after this write (not the
    bucket's TTL): a liveness entry that lasts while it is re-written."""
    with map_nats_errors("write a key"):
        await js.publish(f"$KV.{bucket}.{key}", value, msg_ttl=ttl_s)


async def kv_create(kv: KeyValue, key: str, value: bytes) -> int | None:
    """Write ``key`` only if it holds nothing: its revision, or None if it exists."""
    with map_nats_errors("create a key"):
        try:
            revision: int = await kv.create(key, value)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
    return revision


async def kv_update(kv: KeyValue, key: str, value: bytes, last: int) -> int | None:
    """Compare-and-set: the new revision, or None if ``key`` changed since ``last``."""
    with map_nats_errors("update a key"):
        try:
            revision: int = await kv.update(key, value, last=last)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
    return revision


async def kv_delete(kv: KeyValue, key: str, last: int) -> None:
    """Delete ``key`` unless it changed since ``last`` (then it is someone else's now)."""
    with map_nats_errors("delete a key"):
        try:
            await kv.delete(key, last=last)
        except nats.js.errors.APIError as exc:
            if exc.err_code not in _WRONG_LAST_SEQUENCE:
                raise


# --- streams ------------------------------------------------------------------------------


async def stream_state(js: JetStreamContext, stream: str) -> StreamState | None:
    """The stream's counters, or None if it does not exist."""
    with map_nats_errors("read a stream's state"):
        try:
            return (await js.stream_info(stream)).state
        except nats.js.errors.NotFoundError:
            return None


async def stream_usage(js: JetStreamContext, stream: str) -> tuple[int, int] | None:
    """``(bytes stored, byte limit)`` of a stream (limit -1: none), or None if it is missing."""
    with map_nats_errors("read a stream's usage"):
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            return None
    return info.state.bytes or 0, info.config.max_bytes or -1


async def delivered_upto(js: JetStreamContext, stream: str, consumer: str) -> int:
    """The last stream sequence ``consumer`` delivered (0 if it does not exist yet)."""
    with map_nats_errors("read the consumer"):
        try:
            info = await js.consumer_info(stream, consumer)
        except nats.js.errors.NotFoundError:
            return 0
    return info.delivered.stream_seq or 0


async def consumer_lag(js: JetStreamContext, stream: str, consumer: str) -> tuple[int, int] | None:
    """``consumer``'s (not yet delivered, delivered and not yet acked), or None if absent."""
    with map_nats_errors("read the consumer"):
        try:
            info = await js.consumer_info(stream, consumer)
        except nats.js.errors.NotFoundError:
            return None
    return info.num_pending or 0, info.num_ack_pending or 0


async def subject_count(js: JetStreamContext, stream: str, subject: str) -> int:
    """How many messages ``stream`` keeps on ``subject`` (0 if none, or no such stream)."""
    with map_nats_errors("count kept messages"):
        try:
            info = await js.stream_info(stream, subjects_filter=subject)
        except nats.js.errors.NotFoundError:
            return 0
    return int((info.state.subjects or {}).get(subject, 0))


async def read_subject(js: JetStreamContext, stream: str, subject: str) -> list[bytes]:
    """Every message ``stream`` keeps on ``subject``, oldest first (within 10 s)."""
    return [data for _, data in await read_subject_seqs(js, stream, subject)]


async def read_subject_seqs(
    js: JetStreamContext, stream: str, subject: str
) -> list[tuple[int, bytes]]:
    """Every message ``stream`` keeps on ``subject`` with its stream sequence, in the stream's
    order (within 10 s)."""
    if not await subject_count(js, stream, subject):
        return []
    out: list[tuple[int, bytes]] = []
    done = asyncio.Event()

    async def collect(msg: Msg) -> None:
        out.append((msg.metadata.sequence.stream, msg.data))
        if msg.metadata.num_pending == 0:
            done.set()

    with map_nats_errors("read kept messages"):
        sub = await js.subscribe(
            subject,
            stream=stream,
            cb=collect,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        try:
            await asyncio.wait_for(done.wait(), timeout=_READ_ALL_S)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    return out


async def kept_span(js: JetStreamContext, stream: str, subjects: str) -> KeptSpan | None:
    """The :class:`KeptSpan` of the messages of ``stream`` matching ``subjects`` (a filter with
    wildcards), or None when none is kept; one direct get when none is, two when some are.

    Why: a consumer filtered on a literal subject from its first sequence costs nats-server a
    fraction of one filtered with wildcards from the stream's start (``bench/replay_cost.py``:
    2.7x less at a replay, for every resume of a reconnect storm), and two direct gets find
    both. A request's frames are all on its job's reply subject; a key asked twice on two
    connections (its dedupe window passed) has two, and then the wildcard is kept."""
    first = await get_message(js, stream, 1, subject=subjects, next=True)
    if first is None or first.subject is None or first.seq is None:
        return None
    with map_nats_errors("look up a message"):
        try:
            last = await js.get_last_msg(stream, subjects)
        except nats.js.errors.NotFoundError:
            return None
    return KeptSpan(first.subject if last.subject == first.subject else None, int(first.seq))


async def get_message(
    js: JetStreamContext, stream: str, seq: int, *, subject: str | None = None, next: bool = False
) -> RawStreamMsg | None:
    """Message ``seq`` of ``stream`` (with ``next``: the first at or after it on ``subject``),
    or None if there is none."""
    with map_nats_errors("read a message"):
        try:
            return await js.get_msg(stream, seq=seq, subject=subject, next=next)
        except nats.js.errors.NotFoundError:
            return None


async def publish_acked(js: JetStreamContext, subject: str, data: bytes, stream: str) -> int:
    """Publish into ``stream`` and wait for its acknowledgement; the message's sequence."""
    with map_nats_errors("store a message"):
        ack = await js.publish(subject, data, stream=stream, timeout=5.0)
    return int(ack.seq)


async def publish_expecting(
    js: JetStreamContext, subject: str, data: bytes, stream: str, last_subject_seq: int
) -> int | None:
    """Store ``data`` only if the last message ``stream`` keeps on ``subject`` is
    ``last_subject_seq`` (0: none): its sequence, or None when another came in between.

    A refused publish still reaches core subscribers of ``subject``: readers must follow the
    stream (its republish), not the subject, to ignore it."""
    headers = {"Nats-Expected-Last-Subject-Sequence": str(last_subject_seq)}
    with map_nats_errors("store a message after another"):
        try:
            ack = await js.publish(subject, data, stream=stream, timeout=5.0, headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                return None
            raise
    return int(ack.seq)


async def purge_subject(js: JetStreamContext, stream: str, subject: str) -> None:
    """Delete every message ``stream`` keeps on ``subject``."""
    with map_nats_errors("purge messages"):
        await js.purge_stream(stream, subject=subject)


async def respond(msg: Msg, data: bytes) -> None:
    """Answer a core NATS request."""
    with map_nats_errors("answer a request"):
        await msg.respond(data)


def dropped_subject(exc: Exception, sub: Subscription | None) -> str | None:
    """The subject of the message nats-py dropped, if ``exc`` (given to the client's error
    callback) says ``sub``'s pending queue was full (a slow consumer); else None."""
    if isinstance(exc, nats.errors.SlowConsumerError) and sub is not None and exc.sub is sub:
        return str(exc.subject)
    return None


async def subscribe(
    nc: Client,
    subject: str,
    cb: Callable[[Msg], Awaitable[None]],
    *,
    pending_msgs_limit: int,
    pending_bytes_limit: int,
) -> Subscription:
    """One core subscription with its callback and pending limits (what it may queue)."""
    with map_nats_errors("subscribe"):
        return await nc.subscribe(
            subject,
            cb=cb,
            pending_msgs_limit=pending_msgs_limit,
            pending_bytes_limit=pending_bytes_limit,
        )
