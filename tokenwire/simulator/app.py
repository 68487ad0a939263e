"""A Starlette app that behaves like Dify's Service API (NOTES.md §1-§8): the generation
routes, stops, event streams and ``/_sim``; ``resources.py`` has the other routes.

How this works
--------------
``POST /v1/chat-messages``, ``/v1/completion-messages`` and ``/v1/workflows/run`` validate the
request the way Dify does (errors before the stream are JSON ``{code, message, status}`` with
that HTTP status; a route the app's mode does not serve is ``not_chat_app``,
``app_unavailable`` or ``not_workflow_app``), then hand it to ``engine.Engine``, which runs
the generation as an asyncio task that writes frames into a per-request queue. The HTTP
response only drains that queue and adds ``event: ping`` keep-alives. So, as in Dify
(NOTES §7), a client that goes away does not stop the generation: it still finishes and lands
in the conversation history or the run. Only a stop call stops it (by the task's own user for
chat and completion; by anyone of the app for workflows, as Dify).

A run that reaches a Human Input node (scenarios "human", "chatflow_human") sends
``human_input_required`` and ``workflow_paused`` and ends the response; the rest of the run
goes to ``GET /v1/workflow/{run_id}/events`` listeners, which replay the run's current part
first (a finished run: its ``workflow_finished`` alone).

``/_sim/...`` (no auth) is the operator and test surface: recorded sends (``requests``), other
calls (``calls``) and stops, outages, scripted faults for any ``/v1`` path (``faults``), and
each app's peak concurrency (``apps``). Everything lives in memory in one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final, Literal

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tokenwire.simulator.apps import DEFAULT_APP, AppSpec
from tokenwire.simulator.engine import Engine, SendPayload
from tokenwire.simulator.resources import Resources
from tokenwire.simulator.responses import (
    RAW_SEND,
    USER_REQUIRED,
    DropConnection,
    Signal,
    bad_request,
    error,
    invalid,
    is_uuid,
    json_response,
    loads_object,
    not_found,
    sse_body,
)
from tokenwire.simulator.scenarios import (
    PRE_STREAM_FAULTS,
    WORKFLOW_ID,
    SimConfig,
    SimControls,
    app_mode,
    parse_controls,
)
from tokenwire.simulator.state import (
    Generation,
    Kind,
    Listener,
    Store,
)
from tokenwire.simulator.workflows import (
    finished_data,
)

__all__ = ["abort_streams", "create_app"]

OutageMode = Literal["refuse", "500", "429"]

_RECORDED_HEADERS: Final = ("x-request-id", "x-trace-id")
_MODE_MISMATCH: Final = "Please check if your app mode matches the right API route."


def _not_chat_app() -> Response:
    return error(400, "not_chat_app", _MODE_MISMATCH)


def _not_workflow_app() -> Response:
    return error(400, "not_workflow_app", _MODE_MISMATCH)


def _app_unavailable() -> Response:
    return error(400, "app_unavailable", "App unavailable, please check your app configurations.")


# --------------------------------------------------------------------------- the simulator


class _Simulator:
    """The generation routes, stops, event streams and ``/_sim`` (bound methods as routes)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.config = store.config
        self.engine = Engine(store)
        self.fault_counts: dict[str, int] = {}
        self.outage: tuple[OutageMode, float, bool] | None = None
        """(mode, until, also every other call): ``/_sim/outage``."""

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        yield
        await self.engine.shutdown()

    # ----------------------------------------------------------------------- checks

    def _active_outage(self) -> OutageMode | None:
        """The outage a send (chat, completion, workflow run) meets now, if any."""
        if self.outage is None:
            return None
        mode, until, _ = self.outage
        if time.monotonic() >= until:
            self.outage = None
            return None
        return mode

    def _call_outage(self) -> OutageMode | None:
        """The outage any other call meets: only one started with ``"calls": true``."""
        mode = self._active_outage()
        return mode if mode is not None and self.outage and self.outage[2] else None

    def _fault_now(self, query: str, controls: SimControls) -> SimControls:
        """Apply ``fault_times``: only the first N requests with this query see the fault."""
        if controls.fault is None:
            return controls
        count = self.fault_counts[query] = self.fault_counts.get(query, 0) + 1
        if controls.fault_times is not None and count > controls.fault_times:
            return dataclasses.replace(controls, fault=None)
        return controls

    @staticmethod
    def _fail(fault: str, app: AppSpec | None = None) -> Response:
        """The canned answer of a pre-stream fault or an outage, with Dify's codes."""
        if fault == "refuse":
            return DropConnection()
        if fault == "500":
            return error(
                500, "internal_server_error", "Internal Server Error, please contact support."
            )
        if fault == "429":
            limit = app.max_active_requests if app and app.max_active_requests else 10
            message = (
                "Too many requests. Please try again later. "
                f"The current maximum concurrent requests allowed is {limit}."
            )
            return error(429, "too_many_requests", message)
        if fault == "413":
            return error(413, "file_too_large", "File size exceeded. (simulated)")
        return invalid("Simulated invalid parameter (tw_sim fault 400).")

    def _record(
        self, request: Request, body: Mapping[str, Any] | None, app: AppSpec | None
    ) -> dict[str, Any]:
        """Log what the caller sent; never the Authorization header."""
        body = body or {}
        entry: dict[str, Any] = {
            "path": request.url.path,
            "app": app.name if app is not None else None,
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
        self.store.requests.append(entry)
        return entry

    def _check_files(self, app: AppSpec, user: str, files: list[Any]) -> str | None:
        """A ``local_file`` is usable only by its uploader in its app (NOTES §8)."""
        for item in files:
            if not isinstance(item, dict) or item.get("transfer_method") != "local_file":
                continue
            file_id = item.get("upload_file_id")
            found = self.store.file(app, file_id) if isinstance(file_id, str) else None
            if found is None or found.user != user:
                return "Invalid upload file"
        return None

    async def _admit(
        self, request: Request, route: Kind
    ) -> tuple[AppSpec, SendPayload, SimControls, dict[str, Any]] | Response:
        """Every check Dify makes before a stream starts, in Dify's order."""
        body = loads_object(await request.body())
        app = self.store.app_for(request)
        record = self._record(request, body, app if isinstance(app, AppSpec) else None)
        fault = self._active_outage() or self.store.take_fault(request.url.path)
        if fault is not None:
            return self._fail(fault, app if isinstance(app, AppSpec) else None)
        if not isinstance(app, AppSpec):
            return app
        if route == "chat" and not app.is_chat:
            return _not_chat_app()
        if route == "completion" and app.mode != "completion":
            return _app_unavailable()
        if route == "workflow" and app.mode != "workflow":
            return _not_workflow_app()
        if body is None:
            return bad_request("Invalid JSON payload received or JSON payload is empty.")
        try:
            payload = SendPayload.parse(body, route)
            controls = parse_controls(
                payload.query, payload.inputs, default_scenario=app.default_scenario
            )
            if not app.allows(controls.scenario):
                raise ValueError(
                    f"tw_sim.scenario {controls.scenario!r} is not for a {app.mode} app"
                )
            controls = self._fault_now(payload.query or _seed_key(payload.inputs), controls)
        except ValueError as exc:
            return invalid(str(exc))
        if controls.fault in PRE_STREAM_FAULTS:
            assert controls.fault is not None
            return self._fail(controls.fault, app)
        if app.mode in ("agent", "agent-chat") and not payload.streaming and not app.classic:
            return bad_request("Agent App only supports streaming response mode.")
        # A file variable of ``inputs`` takes a file object too (or a list of them).
        in_inputs = [
            item
            for value in payload.inputs.values()
            for item in (value if isinstance(value, list) else [value])
        ]
        files = [*payload.files, *in_inputs]
        if (problem := self._check_files(app, payload.user, files)) is not None:
            return invalid(problem)
        limit = app.max_active_requests
        if limit and self.store.active.get(app.name, 0) >= limit:
            return self._fail("429", app)
        return app, payload, controls, record

    async def _blocking(self, generation: Generation) -> Response:
        """``response_mode`` other than "streaming": wait for the end, answer one JSON body."""
        while True:
            item = await generation.queue.get()
            if item is Signal.DROP:
                return DropConnection()
            if item is Signal.END:
                break
        if generation.error is not None:
            failure = generation.error
            return error(int(failure["status"]), str(failure["code"]), str(failure["message"]))
        ids = generation.ids
        if generation.kind == "workflow":
            return json_response(_blocking_run(generation))
        message = generation.message
        assert message is not None
        body: dict[str, Any] = {
            "event": "message",
            "task_id": ids.task_id,
            "id": ids.message_id,
            "message_id": ids.message_id,
            "conversation_id": ids.conversation_id,
            "mode": generation.app.mode
            if not generation.app.classic
            else app_mode(generation.controls.scenario),
            "answer": message.answer,
            "metadata": generation.metadata,
            "created_at": ids.created_at,
        }
        if generation.kind == "completion":
            del body["conversation_id"]
        return json_response(body)

    @staticmethod
    def _stream(generation: Generation, request: Request) -> Response:
        body = sse_body(
            generation.queue, generation.ping_interval_s, generation.started, request.scope
        )
        return StreamingResponse(body, media_type="text/event-stream")

    # ----------------------------------------------------------------------- /v1 sends

    async def api_chat_messages(self, request: Request) -> Response:
        """``POST /v1/chat-messages``: every check Dify makes before the stream, then stream."""
        admitted = await self._admit(request, "chat")
        if isinstance(admitted, Response):
            return admitted
        app, payload, controls, record = admitted
        if payload.workflow_id is not None and app.mode == "advanced-chat":
            if not is_uuid(payload.workflow_id):
                return bad_request(f"Invalid workflow_id format: '{payload.workflow_id}'. ")
            if payload.workflow_id != WORKFLOW_ID:
                return not_found(f"Workflow not found with id: {payload.workflow_id}")
        conversation = None
        if payload.conversation_id is not None:
            if not is_uuid(payload.conversation_id):
                return invalid("conversation_id must be a valid UUID")
            conversation = self.store.conversation(app, payload.conversation_id, payload.user)
            if conversation is None:
                return not_found("Conversation Not Exists.")
        generation = self.engine.start(app, "chat", payload, controls, conversation)
        record["task_id"], record["message_id"] = generation.ids.task_id, generation.ids.message_id
        if payload.streaming:
            return self._stream(generation, request)
        return await self._blocking(generation)

    async def api_completion_messages(self, request: Request) -> Response:
        """``POST /v1/completion-messages``: a completion app's one-shot answer."""
        admitted = await self._admit(request, "completion")
        if isinstance(admitted, Response):
            return admitted
        app, payload, controls, record = admitted
        generation = self.engine.start(app, "completion", payload, controls)
        record["task_id"], record["message_id"] = generation.ids.task_id, generation.ids.message_id
        if payload.streaming:
            return self._stream(generation, request)
        return await self._blocking(generation)

    async def api_workflows_run(self, request: Request) -> Response:
        """``POST /v1/workflows/run`` and ``/v1/workflows/{workflow_id}/run``."""
        workflow_id = request.path_params.get("workflow_id")
        known_app = isinstance(self.store.app_for(request), AppSpec)
        if workflow_id is not None and not is_uuid(str(workflow_id)) and known_app:
            return bad_request(f"Invalid workflow_id format: '{workflow_id}'. ")
        admitted = await self._admit(request, "workflow")
        if isinstance(admitted, Response):
            return admitted
        app, payload, controls, record = admitted
        if workflow_id is not None and str(workflow_id) != WORKFLOW_ID:
            return not_found(f"Workflow not found with id: {workflow_id}")
        generation = self.engine.start(app, "workflow", payload, controls)
        record["task_id"] = generation.ids.task_id
        if payload.streaming:
            return self._stream(generation, request)
        return await self._blocking(generation)

    # ----------------------------------------------------------------------- stops

    async def _stop(self, request: Request, route: Kind) -> Response:
        app = self.store.app_for(request)
        if not isinstance(app, AppSpec):
            return app
        if route == "chat" and not app.is_chat:
            return _not_chat_app()
        if route == "completion" and app.mode != "completion":
            return _app_unavailable()
        if route == "workflow" and app.mode != "workflow":
            return _not_workflow_app()
        body = loads_object(await request.body()) or {}
        user = body.get("user")
        if not isinstance(user, str) or not user:
            return invalid(USER_REQUIRED)
        task_id = str(request.path_params["task_id"])
        generation = self.store.generations.get(task_id)
        if generation is not None and (generation.app is not app or generation.kind != route):
            generation = None
        # Chat and completion: only the task's own user stops it. Workflows: anyone (Dify).
        matched = generation is not None and (route == "workflow" or generation.user == user)
        if generation is not None and matched:
            generation.stop.set()
        self.store.stops.append({"task_id": task_id, "user": user, "matched": matched})
        return json_response({"result": "success"})

    async def api_stop(self, request: Request) -> Response:
        """Always "success"; only the task's own user really stops it (NOTES §4)."""
        return await self._stop(request, "chat")

    async def api_completion_stop(self, request: Request) -> Response:
        return await self._stop(request, "completion")

    async def api_workflow_stop(self, request: Request) -> Response:
        """Not user-checked, as Dify: whoever knows the task id stops the run."""
        return await self._stop(request, "workflow")

    # ----------------------------------------------------------------------- event streams

    async def api_workflow_events(self, request: Request) -> Response:
        """``GET /v1/workflow/{run_id}/events``: the run's creator only (else 404)."""
        app = self.store.app_for(request)
        self.store.calls.append(
            {
                "method": "GET",
                "path": request.url.path,
                "app": app.name if isinstance(app, AppSpec) else None,
                "user": request.query_params.get("user", ""),
                "query": dict(request.query_params),
                "body": None,
            }
        )
        fault = self._call_outage() or self.store.take_fault(request.url.path)
        if fault is not None:
            return self._fail(fault)
        if not isinstance(app, AppSpec):
            return app
        if not app.has_workflow:
            return _not_workflow_app()
        user = request.query_params.get("user", "")
        if not user:
            return invalid(USER_REQUIRED)
        run = self.store.run(app, str(request.path_params["workflow_run_id"]))
        if run is None or run.user != user:
            return not_found("Workflow run not found")
        continue_on_pause = request.query_params.get("continue_on_pause", "").lower() == "true"
        queue: asyncio.Queue[bytes | Signal] = asyncio.Queue()
        if run.over:
            queue.put_nowait(run.final or b"")
            queue.put_nowait(Signal.END)
        else:
            for frame in run.frames[run.replay_from :]:
                queue.put_nowait(frame)
            if run.status == "paused" and not continue_on_pause:
                queue.put_nowait(Signal.END)
            else:
                run.listeners.append(Listener(queue, continue_on_pause))
        loop = asyncio.get_running_loop()
        body = sse_body(queue, self.config.ping_interval_s, loop.time(), request.scope)
        return StreamingResponse(body, media_type="text/event-stream")

    # ----------------------------------------------------------------------- /_sim endpoints

    async def sim_requests(self, _request: Request) -> Response:
        return json_response(self.store.requests)

    async def sim_calls(self, _request: Request) -> Response:
        """Every other ``/v1`` call: method, path, app, user, query and body (never the key)."""
        return json_response(self.store.calls)

    async def sim_stops(self, _request: Request) -> Response:
        return json_response(self.store.stops)

    async def sim_apps(self, _request: Request) -> Response:
        """Each app's mode, active and peak concurrent generations (never a key)."""
        apps = list(self.store.apps.values()) or [DEFAULT_APP]
        return json_response(
            [
                {
                    "name": spec.name,
                    "mode": spec.mode,
                    "active": self.store.active.get(spec.name, 0),
                    "peak_active": self.store.peak_active.get(spec.name, 0),
                }
                for spec in apps
            ]
        )

    async def sim_clear(self, _request: Request) -> Response:
        """Forget recorded requests, calls and stops, peaks, and restart ``fault_times``."""
        self.store.requests.clear()
        self.store.calls.clear()
        self.store.stops.clear()
        self.store.peak_active.clear()
        self.fault_counts.clear()
        return json_response({"result": "success"})

    async def sim_outage(self, request: Request) -> Response:
        """``{"mode": "refuse"|"500"|"429", "seconds": s, "calls": false}``: fail every send
        (chat, completion, workflow run); with ``calls``, every other ``/v1`` call too except
        app metadata (history, conversations, uploads, …: off by default, as it always was)."""
        body = loads_object(await request.body()) or {}
        mode, seconds, calls = body.get("mode"), body.get("seconds"), body.get("calls", False)
        if mode not in ("refuse", "500", "429"):
            return invalid('mode must be "refuse", "500" or "429"')
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
            return invalid("seconds must be a positive number")
        if not isinstance(calls, bool):
            return invalid("calls must be a boolean")
        self.outage = (mode, time.monotonic() + seconds, calls)
        return json_response({"result": "success", "mode": mode, "seconds": seconds})

    async def sim_faults(self, request: Request) -> Response:
        """``{"path": "/v1/…", "fault": "refuse"|"500"|"429"|"413", "times": n}``: the next
        ``n`` calls whose path starts with ``path`` fail (``times`` -1: until cleared)."""
        body = loads_object(await request.body()) or {}
        path, fault, times = body.get("path"), body.get("fault"), body.get("times", 1)
        if not isinstance(path, str) or not path.startswith("/v1/"):
            return invalid('path must start with "/v1/"')
        if fault not in ("refuse", "500", "429", "413"):
            return invalid('fault must be "refuse", "500", "429" or "413"')
        if isinstance(times, bool) or not isinstance(times, int) or times == 0:
            return invalid("times must be a non-zero integer (-1: until cleared)")
        self.store.scripted_faults.append({"path": path, "fault": fault, "times": times})
        return json_response({"result": "success"})

    async def sim_faults_clear(self, _request: Request) -> Response:
        self.store.scripted_faults.clear()
        return json_response({"result": "success"})

    async def sim_outage_end(self, _request: Request) -> Response:
        self.outage = None
        return json_response({"result": "success"})

    async def sim_health(self, _request: Request) -> Response:
        return json_response({"status": "ok"})


# --------------------------------------------------------------------------- pure helpers


def _seed_key(inputs: Mapping[str, Any]) -> str:
    """What ``fault_times`` counts a query-less send by."""
    return orjson.dumps(inputs, option=orjson.OPT_SORT_KEYS).decode()


def _blocking_run(generation: Generation) -> dict[str, Any]:
    """A blocking run's body (WorkflowBlockingResponse); a paused run says "paused"."""
    run = generation.run
    assert run is not None
    if run.status == "paused":
        data = finished_data(
            generation.ids,
            status="paused",
            outputs={},
            total_tokens=0,
            total_steps=run.total_steps,
            elapsed_s=0.0,
        )
        form = run.form
        assert form is not None
        data["paused_nodes"] = [form.spec.node_id]
        data["reasons"] = [
            {
                "TYPE": "human_input_required",
                **form.spec.definition(form.token, form.expiration_time),
            }
        ]
    else:
        data = {
            "id": run.id,
            "workflow_id": WORKFLOW_ID,
            "sequence_number": 1,
            "status": run.status,
            "outputs": run.outputs,
            "error": run.error,
            "elapsed_time": run.elapsed_time,
            "total_tokens": run.total_tokens,
            "total_steps": run.total_steps,
            "created_by": {"id": generation.ids.derive("end_user"), "user": "end_user"},
            "created_at": run.created_at,
            "finished_at": run.finished_at,
            "exceptions_count": 0,
            "files": [],
        }
    return {"task_id": generation.ids.task_id, "workflow_run_id": run.id, "data": data}


class _SimulatorApp(Starlette):
    """Starlette that keeps the ASGI server's own ``send`` in the scope (``responses.py``)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[RAW_SEND] = send
        await super().__call__(scope, receive, send)


async def _http_error(_request: Request, exc: Exception) -> Response:
    """Unknown paths and methods answer in Dify's error shape, not Starlette's plain text."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    return error(exc.status_code, code, str(exc.detail))


def abort_streams(app: Starlette) -> None:
    """Call on the server's loop when shutting down (``tokenwire.simulator.server`` does).

    Otherwise uvicorn waits for every open stream, and a stalled one never ends by itself, so
    it would be cancelled after the graceful timeout with a logged traceback.
    """
    simulator = app.state.simulator
    assert isinstance(simulator, _Simulator)
    simulator.engine.abort()


def create_app(config: SimConfig | None = None) -> Starlette:
    """A fresh simulator (its own empty store) as an ASGI app; serve it with uvicorn."""
    store = Store(config or SimConfig())
    sim = _Simulator(store)
    res = Resources(store, outage=sim._call_outage, fail=sim._fail)
    routes = [
        Route("/v1/chat-messages", sim.api_chat_messages, methods=["POST"]),
        Route("/v1/chat-messages/{task_id}/stop", sim.api_stop, methods=["POST"]),
        Route("/v1/completion-messages", sim.api_completion_messages, methods=["POST"]),
        Route("/v1/completion-messages/{task_id}/stop", sim.api_completion_stop, methods=["POST"]),
        Route("/v1/workflows/run", sim.api_workflows_run, methods=["POST"]),
        Route("/v1/workflows/tasks/{task_id}/stop", sim.api_workflow_stop, methods=["POST"]),
        Route("/v1/workflows/run/{workflow_run_id}", res.api_run_detail, methods=["GET"]),
        Route("/v1/workflows/logs", res.api_workflow_logs, methods=["GET"]),
        Route("/v1/workflows/{workflow_id}/run", sim.api_workflows_run, methods=["POST"]),
        Route("/v1/workflow/{workflow_run_id}/events", sim.api_workflow_events, methods=["GET"]),
        Route("/v1/form/human_input/{form_token}", res.api_form_get, methods=["GET"]),
        Route("/v1/form/human_input/{form_token}", res.api_form_submit, methods=["POST"]),
        *res.routes(),
        Route("/_sim/requests", sim.sim_requests, methods=["GET"]),
        Route("/_sim/requests", sim.sim_clear, methods=["DELETE"]),
        Route("/_sim/calls", sim.sim_calls, methods=["GET"]),
        Route("/_sim/stops", sim.sim_stops, methods=["GET"]),
        Route("/_sim/apps", sim.sim_apps, methods=["GET"]),
        Route("/_sim/faults", sim.sim_faults, methods=["POST"]),
        Route("/_sim/faults", sim.sim_faults_clear, methods=["DELETE"]),
        Route("/_sim/outage", sim.sim_outage, methods=["POST"]),
        Route("/_sim/outage", sim.sim_outage_end, methods=["DELETE"]),
        Route("/_sim/health", sim.sim_health, methods=["GET"]),
    ]
    app = _SimulatorApp(
        routes=routes, lifespan=sim.lifespan, exception_handlers={HTTPException: _http_error}
    )
    app.state.simulator = sim
    return app
