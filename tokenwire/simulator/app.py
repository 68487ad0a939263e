"""A Starlette app that behaves like Dify's Service API for chat apps (NOTES.md §1-§7).

How this works
--------------
``POST /v1/chat-messages`` validates the request the way Dify does (errors before the stream
are JSON ``{code, message, status}`` with that HTTP status), then starts a *generation*: an
asyncio task that walks the pure script from :func:`scenarios.build_script`, updates the stored
message and writes encoded frames into a per-request queue. The HTTP response only drains that
queue and adds ``event: ping`` keep-alives. So, as in Dify (NOTES §7), a client that goes away
does not stop the generation: it still finishes and lands in the conversation history. Only
``POST /v1/chat-messages/{task_id}/stop`` by the task's own user stops it.

Dropping a connection with no HTTP response at all (fault "refuse", and "cut" mid-body) needs
the socket, which ASGI hides. uvicorn's ``send`` is a bound method of its per-request cycle,
whose ``transport`` attribute is that socket; :class:`_SimulatorApp` keeps the server's own
``send`` in the scope so an endpoint can reach it. An httpx client sees
``httpx.RemoteProtocolError`` in both cases ("Server disconnected without sending a response",
or "peer closed connection without sending complete message body").

``/_sim/...`` (no auth) is the operator and test surface: recorded requests and stop calls,
and outages. Everything lives in memory in one event loop, so there are no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tokenwire.simulator.scenarios import (
    PING_FRAME,
    PRE_STREAM_FAULTS,
    Drop,
    Emit,
    Fault,
    SimConfig,
    SimControls,
    StreamIds,
    app_mode,
    build_script,
    encode_event,
    parse_controls,
    stopped_events,
)

__all__ = ["abort_streams", "create_app"]

MessageStatus = Literal["generating", "normal", "stopped", "error"]
OutageMode = Literal["refuse", "500", "429"]

_RAW_SEND: Final = "tokenwire.simulator.raw_send"
_MAX_STALL_S: Final = 1200.0
"""A stalled generation gives up like Dify's ``APP_MAX_EXECUTION_TIME`` (stops itself)."""
_DROP_GRACE_S: Final = 5.0
_RECORDED_HEADERS: Final = ("x-request-id", "x-trace-id")
_AUTH_HEADERS: Final = {"WWW-Authenticate": 'Bearer realm="api"'}


class _Signal(enum.Enum):
    """Queue items that are not frames: what the HTTP side must do besides writing."""

    END = "end"
    DROP = "drop"
    STALL = "stall"


class ConnectionDropError(ConnectionError):
    """The server is not uvicorn, so a connection cannot be closed without a response."""


# --------------------------------------------------------------------------- helpers


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def _error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    """Dify's error body for failures before the stream (NOTES §5)."""
    return _json({"code": code, "message": message, "status": status}, status, headers)


def _invalid(message: str) -> Response:
    return _error(400, "invalid_param", message)


def _not_found(message: str) -> Response:
    return _error(404, "not_found", message)


_USER_REQUIRED: Final = "Arg user must be provided."


def _loads_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _close_transport(scope: Scope) -> bool:
    """Close the client's TCP connection under the ASGI server; False if it cannot be reached."""
    owner = getattr(scope.get(_RAW_SEND), "__self__", None)
    transport = getattr(owner, "transport", None)
    close = getattr(transport, "close", None)
    if not callable(close):
        return False
    close()
    return True


async def _wait_disconnect(receive: Receive) -> None:
    """Return once the server has noticed the close, so it does not try to answer after it."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_DROP_GRACE_S):
            while (await receive())["type"] != "http.disconnect":
                pass


class _DropConnection(Response):
    """A "response" that closes the connection without writing a single byte."""

    def __init__(self) -> None:
        super().__init__(status_code=500)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _close_transport(scope):
            raise ConnectionDropError("cannot reach the transport to drop the connection")
        await _wait_disconnect(receive)


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}")
    return value


# --------------------------------------------------------------------------- state


@dataclass(eq=False)
class _Message:
    id: str
    task_id: str
    conversation_id: str
    query: str
    inputs: dict[str, Any]
    created_at: int
    answer: str = ""
    status: MessageStatus = "generating"
    error: str | None = None
    message_files: list[dict[str, Any]] = field(default_factory=list)
    retriever_resources: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Dify's ``GET /messages`` item; ``status`` adds "generating" and "stopped"."""
        return {
            "id": self.id,
            "conversation_id": self.conversation_id,
            "inputs": self.inputs,
            "query": self.query,
            "answer": self.answer,
            "message_files": self.message_files,
            "feedback": None,
            "retriever_resources": self.retriever_resources,
            "created_at": self.created_at,
            "status": self.status,
            "error": self.error,
        }


@dataclass(eq=False)
class _Conversation:
    id: str
    user: str
    name: str
    inputs: dict[str, Any]
    created_at: int
    updated_at: int
    order: int
    """Tie-breaker for ``-updated_at``: timestamps are whole seconds."""
    messages: list[_Message] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "inputs": self.inputs,
            "status": "normal",
            "introduction": "",
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(eq=False)
class _Generation:
    """One running answer: owned by a user, stoppable, drained by at most one HTTP response."""

    ids: StreamIds
    user: str
    query: str
    controls: SimControls
    message: _Message
    ping_interval_s: float
    started: float
    queue: asyncio.Queue[bytes | _Signal] = field(default_factory=asyncio.Queue)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    completion_tokens: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    task: asyncio.Task[None] | None = None

    async def sleep_or_stop(self, seconds: float) -> bool:
        """Sleep, waking early on stop; True when the generation must stop now."""
        if seconds > 0 and not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self.stop.wait()
        return self.stop.is_set()


@dataclass(frozen=True, slots=True)
class _ChatPayload:
    query: str
    inputs: dict[str, Any]
    user: str
    streaming: bool
    conversation_id: str | None

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> _ChatPayload:
        """Validate like Dify: the ``user`` check first, then the pydantic-style field errors.

        Raises ValueError, which the endpoint turns into 400 ``invalid_param`` as Dify does.
        """
        user = body.get("user")
        if not isinstance(user, str) or not user:
            raise ValueError(_USER_REQUIRED)
        problems: list[str] = []
        query, inputs = body.get("query"), body.get("inputs")
        if "query" not in body:
            problems.append("query\n  Field required [type=missing]")
        elif not isinstance(query, str):
            problems.append("query\n  Input should be a valid string [type=string_type]")
        if "inputs" not in body:
            problems.append("inputs\n  Field required [type=missing]")
        elif not isinstance(inputs, dict):
            problems.append("inputs\n  Input should be a valid dictionary [type=dict_type]")
        conversation_id = body.get("conversation_id")
        if conversation_id is not None and not isinstance(conversation_id, str):
            problems.append("conversation_id\n  Input should be a valid string [type=string_type]")
        files = body.get("files")
        if files is not None and not isinstance(files, list):
            problems.append("files\n  Input should be a valid list [type=list_type]")
        if problems:
            count = f"{len(problems)} validation error{'s' if len(problems) > 1 else ''}"
            raise ValueError(f"{count} for ChatRequestPayload\n" + "\n".join(problems))
        assert isinstance(query, str) and isinstance(inputs, dict)
        return cls(
            query=query,
            inputs=inputs,
            user=user,
            streaming=body.get("response_mode") == "streaming",
            conversation_id=conversation_id or None,
        )


# --------------------------------------------------------------------------- the simulator


class _Simulator:
    """All state of one simulated Dify app, and its endpoints (bound methods as routes)."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.conversations: dict[str, _Conversation] = {}
        self.generations: dict[str, _Generation] = {}
        self.requests: list[dict[str, Any]] = []
        self.stops: list[dict[str, Any]] = []
        self.fault_counts: dict[str, int] = {}
        self.outage: tuple[OutageMode, float] | None = None
        self._order = itertools.count(1)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        """On shutdown, cancel generations nobody stopped (a stall would otherwise linger)."""
        yield
        tasks = [g.task for g in self.generations.values() if g.task and not g.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def abort_streams(self) -> None:
        """Cut open streams and cancel running generations: a Dify process going away."""
        for generation in self.generations.values():
            if generation.task is not None and not generation.task.done():
                generation.queue.put_nowait(_Signal.DROP)
                generation.task.cancel()

    # ----------------------------------------------------------------------- checks

    def _check_auth(self, request: Request) -> Response | None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            message = "Authorization header must be provided and start with 'Bearer'"
            return _error(401, "unauthorized", message, _AUTH_HEADERS)
        expected = self.config.api_key
        if (key != expected) if expected is not None else not key.startswith("app-"):
            return _error(401, "unauthorized", "Access token is invalid", _AUTH_HEADERS)
        return None

    def _owned_conversation(self, conversation_id: str, user: str) -> _Conversation | None:
        """Another user's conversation is as invisible as an unknown one (NOTES §1)."""
        conversation = self.conversations.get(conversation_id)
        return conversation if conversation and conversation.user == user else None

    def _active_outage(self) -> OutageMode | None:
        if self.outage is None:
            return None
        mode, until = self.outage
        if time.monotonic() >= until:
            self.outage = None
            return None
        return mode

    def _fault_now(self, query: str, controls: SimControls) -> SimControls:
        """Apply ``fault_times``: only the first N requests with this query see the fault."""
        if controls.fault is None:
            return controls
        count = self.fault_counts[query] = self.fault_counts.get(query, 0) + 1
        if controls.fault_times is not None and count > controls.fault_times:
            return dataclasses.replace(controls, fault=None)
        return controls

    @staticmethod
    def _fail(fault: Fault | OutageMode) -> Response:
        """The canned answer of a pre-stream fault or an outage, with Dify's codes."""
        if fault == "refuse":
            return _DropConnection()
        if fault == "500":
            return _error(
                500, "internal_server_error", "Internal Server Error, please contact support."
            )
        if fault == "429":
            message = (
                "Too many requests. Please try again later. "
                "The current maximum concurrent requests allowed is 10."
            )
            return _error(429, "too_many_requests", message)
        if fault == "413":
            return _error(413, "file_too_large", "File size exceeded. (simulated)")
        return _invalid("Simulated invalid parameter (tw_sim fault 400).")

    def _record(self, request: Request, body: Mapping[str, Any] | None) -> dict[str, Any]:
        """Log what the caller sent; never the Authorization header."""
        body = body or {}
        entry: dict[str, Any] = {
            "path": request.url.path,
            "user": body.get("user"),
            "conversation_id": body.get("conversation_id"),
            "query": body.get("query"),
            "inputs": body.get("inputs"),
            "files": body.get("files"),
            "response_mode": body.get("response_mode"),
            "task_id": None,
            "message_id": None,
            "headers": {k: request.headers[k] for k in _RECORDED_HEADERS if k in request.headers},
        }
        self.requests.append(entry)
        return entry

    # ----------------------------------------------------------------------- generation

    def _start(
        self, payload: _ChatPayload, controls: SimControls, conversation: _Conversation | None
    ) -> _Generation:
        now = int(time.time())
        if conversation is None:
            conversation = _Conversation(
                id=str(uuid.uuid4()),
                user=payload.user,
                name=payload.query.strip()[:40] or "New conversation",
                inputs=payload.inputs,
                created_at=now,
                updated_at=now,
                order=next(self._order),
            )
            self.conversations[conversation.id] = conversation
        conversation.updated_at, conversation.order = now, next(self._order)
        ids = StreamIds(str(uuid.uuid4()), str(uuid.uuid4()), conversation.id, now)
        message = _Message(
            ids.message_id, ids.task_id, conversation.id, payload.query, payload.inputs, now
        )
        conversation.messages.append(message)
        ping = controls.ping_interval_s
        generation = _Generation(
            ids=ids,
            user=payload.user,
            query=payload.query,
            controls=controls,
            message=message,
            ping_interval_s=ping if ping is not None else self.config.ping_interval_s,
            started=asyncio.get_running_loop().time(),
        )
        self.generations[ids.task_id] = generation
        generation.task = asyncio.create_task(
            self._generate(generation, payload.inputs), name=f"tw-sim-{ids.task_id}"
        )
        return generation

    def _emit(self, generation: _Generation, step: Emit) -> None:
        """Apply one event to the stored message, then queue its frame."""
        message, event = generation.message, step.event
        message.answer = step.apply_to(message.answer)
        if step.is_token:
            generation.completion_tokens += 1
        if step.name == "message_file":
            keys = ("id", "type", "url", "belongs_to")
            message.message_files.append({k: event[k] for k in keys})
        elif step.name == "message_end":
            generation.metadata = event["metadata"]
            message.retriever_resources = event["metadata"]["retriever_resources"]
            if message.status == "generating":
                message.status = "normal"
        elif step.name == "error":
            generation.error = {k: event[k] for k in ("code", "message", "status")}
            message.status, message.error = "error", str(event["message"])
        generation.queue.put_nowait(encode_event(event, self.config.json_style))

    async def _generate(self, generation: _Generation, inputs: Mapping[str, Any]) -> None:
        """Walk the script; a stop (or the stall giving up) ends it with ``message_end``."""
        script = build_script(
            generation.ids, generation.query, inputs, generation.controls, self.config
        )
        try:
            for step in script:
                if isinstance(step, Emit):
                    if await generation.sleep_or_stop(step.delay_s):
                        break
                    self._emit(generation, step)
                elif isinstance(step, Drop):
                    generation.queue.put_nowait(_Signal.DROP)
                else:
                    generation.queue.put_nowait(_Signal.STALL)
                    await generation.sleep_or_stop(_MAX_STALL_S)
                    break
            else:
                return
            if generation.message.status != "generating":
                return  # stopped after message_end (during TTS): nothing left to end
            generation.message.status = "stopped"
            loop = asyncio.get_running_loop()
            for event in stopped_events(
                generation.ids,
                query=generation.query,
                scenario=generation.controls.scenario,
                answer=generation.message.answer,
                completion_tokens=generation.completion_tokens,
                latency_s=loop.time() - generation.started,
            ):
                self._emit(generation, Emit(event))
        finally:
            generation.queue.put_nowait(_Signal.END)

    async def _stream(self, generation: _Generation, scope: Scope) -> AsyncIterator[bytes]:
        """The response body: frames from the queue, pings on Dify's cadence, faults."""
        loop = asyncio.get_running_loop()
        interval = generation.ping_interval_s
        next_ping = generation.started + interval
        pinging = True
        yield PING_FRAME
        while True:
            try:
                async with asyncio.timeout(max(0.0, next_ping - loop.time()) if pinging else None):
                    item = await generation.queue.get()
            except TimeoutError:
                yield PING_FRAME
                while next_ping <= loop.time():
                    next_ping += interval
                continue
            if isinstance(item, bytes):
                yield item
            elif item is _Signal.STALL:
                pinging = False  # a stalled upstream sends nothing at all (NOTES §7, #24675)
            elif item is _Signal.DROP:
                if not _close_transport(scope):
                    raise ConnectionDropError("cannot reach the transport to cut the stream")
                # Starlette cancels this generator when the server reports the disconnect.
                await asyncio.sleep(_DROP_GRACE_S)
                return
            else:
                return

    async def _blocking(self, generation: _Generation) -> Response:
        """``response_mode`` other than "streaming": wait for the end, answer one JSON body."""
        while True:
            item = await generation.queue.get()
            if item is _Signal.DROP:
                return _DropConnection()
            if item is _Signal.END:
                break
        if generation.error is not None:
            error = generation.error
            return _error(int(error["status"]), str(error["code"]), str(error["message"]))
        ids, message = generation.ids, generation.message
        return _json(
            {
                "event": "message",
                "task_id": ids.task_id,
                "id": ids.message_id,
                "message_id": ids.message_id,
                "conversation_id": ids.conversation_id,
                "mode": app_mode(generation.controls.scenario),
                "answer": message.answer,
                "metadata": generation.metadata,
                "created_at": ids.created_at,
            }
        )

    # ----------------------------------------------------------------------- /v1 endpoints

    async def api_chat_messages(self, request: Request) -> Response:
        """``POST /v1/chat-messages``: every check Dify makes before the stream, then stream."""
        body = _loads_object(await request.body())
        record = self._record(request, body)
        outage = self._active_outage()
        if outage is not None:
            return self._fail(outage)
        if (denied := self._check_auth(request)) is not None:
            return denied
        if body is None:
            return _error(
                400, "bad_request", "Invalid JSON payload received or JSON payload is empty."
            )
        try:
            payload = _ChatPayload.parse(body)
            controls = self._fault_now(payload.query, parse_controls(payload.query, payload.inputs))
        except ValueError as exc:
            return _invalid(str(exc))
        if controls.fault in PRE_STREAM_FAULTS:
            return self._fail(controls.fault)
        conversation = None
        if payload.conversation_id is not None:
            if not _is_uuid(payload.conversation_id):
                return _invalid("conversation_id must be a valid UUID")
            conversation = self._owned_conversation(payload.conversation_id, payload.user)
            if conversation is None:
                return _not_found("Conversation Not Exists.")
        generation = self._start(payload, controls, conversation)
        record["task_id"], record["message_id"] = generation.ids.task_id, generation.ids.message_id
        if payload.streaming:
            return StreamingResponse(
                self._stream(generation, request.scope), media_type="text/event-stream"
            )
        return await self._blocking(generation)

    async def api_stop(self, request: Request) -> Response:
        """Always "success"; only the task's own user really stops it (NOTES §4)."""
        if (denied := self._check_auth(request)) is not None:
            return denied
        body = _loads_object(await request.body()) or {}
        user = body.get("user")
        if not isinstance(user, str) or not user:
            return _invalid(_USER_REQUIRED)
        task_id = str(request.path_params["task_id"])
        generation = self.generations.get(task_id)
        matched = generation is not None and generation.user == user
        if generation is not None and matched:
            generation.stop.set()
        self.stops.append({"task_id": task_id, "user": user, "matched": matched})
        return _json({"result": "success"})

    async def api_messages(self, request: Request) -> Response:
        """``GET /v1/messages``: latest page first, older pages by ``first_id`` (as Dify)."""
        if (denied := self._check_auth(request)) is not None:
            return denied
        params = request.query_params
        user, conversation_id = params.get("user", ""), params.get("conversation_id", "")
        if not user:
            return _invalid(_USER_REQUIRED)
        try:
            limit = _query_int(request, "limit", 20, 1, 100)
        except ValueError as exc:
            return _invalid(str(exc))
        if not _is_uuid(conversation_id):
            return _invalid("conversation_id must be a valid UUID")
        conversation = self._owned_conversation(conversation_id, user)
        if conversation is None:
            return _not_found("Conversation Not Exists.")
        older = conversation.messages
        first_id = params.get("first_id")
        if first_id:
            index = next((i for i, m in enumerate(older) if m.id == first_id), None)
            if index is None:
                return _not_found("First Message Not Exists.")
            older = older[:index]
        page = older[-limit:]
        return _json(
            {"limit": limit, "has_more": len(older) > limit, "data": [m.as_dict() for m in page]}
        )

    async def api_conversations(self, request: Request) -> Response:
        """``GET /v1/conversations``: the user's conversations, newest activity first."""
        if (denied := self._check_auth(request)) is not None:
            return denied
        user = request.query_params.get("user", "")
        if not user:
            return _invalid(_USER_REQUIRED)
        try:
            limit = _query_int(request, "limit", 20, 1, 100)
        except ValueError as exc:
            return _invalid(str(exc))
        sort_by = request.query_params.get("sort_by", "-updated_at")
        keys = {"created_at": lambda c: c.created_at, "updated_at": lambda c: c.order}
        if sort_by.lstrip("-") not in keys:
            return _invalid("sort_by must be created_at, -created_at, updated_at or -updated_at")
        owned = sorted(
            (c for c in self.conversations.values() if c.user == user),
            key=keys[sort_by.lstrip("-")],
            reverse=sort_by.startswith("-"),
        )
        last_id = request.query_params.get("last_id")
        if last_id:
            index = next((i for i, c in enumerate(owned) if c.id == last_id), None)
            if index is None:
                return _not_found("Last Conversation Not Exists.")
            owned = owned[index + 1 :]
        return _json(
            {
                "limit": limit,
                "has_more": len(owned) > limit,
                "data": [c.as_dict() for c in owned[:limit]],
            }
        )

    async def api_parameters(self, request: Request) -> Response:
        """``GET /v1/parameters``: what a frontend reads to render the chat (NOTES §6)."""
        if (denied := self._check_auth(request)) is not None:
            return denied
        off = {"enabled": False}
        return _json(
            {
                "opening_statement": "Hi! I am the tokenwire Dify simulator.",
                "suggested_questions": ["/agent What is a gateway?", "/chatflow Hello", "/slow Hi"],
                "suggested_questions_after_answer": off,
                "speech_to_text": off,
                "text_to_speech": {
                    "enabled": False,
                    "voice": "",
                    "language": "",
                    "autoPlay": "disabled",
                },
                "retriever_resource": {"enabled": True},
                "annotation_reply": off,
                "more_like_this": off,
                "sensitive_word_avoidance": off,
                "user_input_form": [],
                "file_upload": {
                    "image": {
                        "enabled": False,
                        "number_limits": 3,
                        "detail": "high",
                        "transfer_methods": ["remote_url", "local_file"],
                    }
                },
                "system_parameters": {
                    "file_size_limit": 15,
                    "image_file_size_limit": 10,
                    "audio_file_size_limit": 50,
                    "video_file_size_limit": 100,
                },
            }
        )

    async def api_info(self, request: Request) -> Response:
        """``GET /v1/info``."""
        if (denied := self._check_auth(request)) is not None:
            return denied
        return _json(
            {
                "name": "tokenwire Dify simulator",
                "description": "Speaks Dify's Service API streaming format for tests and demos.",
                "tags": ["simulator"],
                "mode": "advanced-chat",
                "author_name": "tokenwire",
            }
        )

    # ----------------------------------------------------------------------- /_sim endpoints

    async def sim_requests(self, _request: Request) -> Response:
        return _json(self.requests)

    async def sim_stops(self, _request: Request) -> Response:
        return _json(self.stops)

    async def sim_clear(self, _request: Request) -> Response:
        """Forget recorded requests and stops, and restart ``fault_times`` counting."""
        self.requests.clear()
        self.stops.clear()
        self.fault_counts.clear()
        return _json({"result": "success"})

    async def sim_outage(self, request: Request) -> Response:
        """``{"mode": "refuse"|"500"|"429", "seconds": s}``: fail every chat-messages send."""
        body = _loads_object(await request.body()) or {}
        mode, seconds = body.get("mode"), body.get("seconds")
        if mode not in ("refuse", "500", "429"):
            return _invalid('mode must be "refuse", "500" or "429"')
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
            return _invalid("seconds must be a positive number")
        self.outage = (mode, time.monotonic() + seconds)
        return _json({"result": "success", "mode": mode, "seconds": seconds})

    async def sim_outage_end(self, _request: Request) -> Response:
        self.outage = None
        return _json({"result": "success"})

    async def sim_health(self, _request: Request) -> Response:
        return _json({"status": "ok"})


class _SimulatorApp(Starlette):
    """Starlette that keeps the ASGI server's own ``send`` in the scope (see module doc)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[_RAW_SEND] = send
        await super().__call__(scope, receive, send)


async def _http_error(_request: Request, exc: Exception) -> Response:
    """Unknown paths and methods answer in Dify's error shape, not Starlette's plain text."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    return _error(exc.status_code, code, str(exc.detail))


def abort_streams(app: Starlette) -> None:
    """Call on the server's loop when shutting down (``tokenwire.simulator.server`` does).

    Otherwise uvicorn waits for every open stream, and a stalled one never ends by itself, so
    it would be cancelled after the graceful timeout with a logged traceback.
    """
    simulator = app.state.simulator
    assert isinstance(simulator, _Simulator)
    simulator.abort_streams()


def create_app(config: SimConfig | None = None) -> Starlette:
    """A fresh simulator (its own empty store) as an ASGI app; serve it with uvicorn."""
    sim = _Simulator(config or SimConfig())
    routes = [
        Route("/v1/chat-messages", sim.api_chat_messages, methods=["POST"]),
        Route("/v1/chat-messages/{task_id}/stop", sim.api_stop, methods=["POST"]),
        Route("/v1/messages", sim.api_messages, methods=["GET"]),
        Route("/v1/conversations", sim.api_conversations, methods=["GET"]),
        Route("/v1/parameters", sim.api_parameters, methods=["GET"]),
        Route("/v1/info", sim.api_info, methods=["GET"]),
        Route("/_sim/requests", sim.sim_requests, methods=["GET"]),
        Route("/_sim/requests", sim.sim_clear, methods=["DELETE"]),
        Route("/_sim/stops", sim.sim_stops, methods=["GET"]),
        Route("/_sim/outage", sim.sim_outage, methods=["POST"]),
        Route("/_sim/outage", sim.sim_outage_end, methods=["DELETE"]),
        Route("/_sim/health", sim.sim_health, methods=["GET"]),
    ]
    app = _SimulatorApp(
        routes=routes, lifespan=sim.lifespan, exception_handlers={HTTPException: _http_error}
    )
    app.state.simulator = sim
    return app
