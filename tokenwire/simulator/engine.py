"""The generations: walking a script into a stored message or run and its open streams.

How this works
--------------
:meth:`Engine.start` turns one admitted send into a :class:`~tokenwire.simulator.state.Generation`
and an asyncio task that walks its steps (``scenarios.build_script`` or
``workflows.build_flow``): each :class:`Emit` updates the stored message and run, then its
encoded frame goes to the first response's queue and to every ``/workflow/{id}/events``
listener. A :class:`~tokenwire.simulator.workflows.Pause` ends the first response, frees the
app's stream slot and waits for the form (``resources.py`` resolves it), its expiry or a stop;
the rest of the run then goes to the listeners. A stop ends the stream the way Dify does
(``message_end``, or ``workflow_finished`` with status "stopped"). Nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import secrets
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from tokenwire.simulator.apps import AppSpec
from tokenwire.simulator.responses import USER_REQUIRED, Signal
from tokenwire.simulator.scenarios import (
    Drop,
    Emit,
    Event,
    SimControls,
    Step,
    StreamIds,
    build_script,
    encode_event,
    stopped_events,
)
from tokenwire.simulator.state import Conversation, Form, Generation, Kind, Message, Run, Store
from tokenwire.simulator.workflows import (
    FlowStep,
    Pause,
    TimedOut,
    as_completion_event,
    build_flow,
    run_id_of,
    stopped_flow_events,
)

__all__ = ["FLOW_SCENARIOS", "Engine", "SendPayload"]

_MAX_STALL_S: Final = 1200.0
"""A stalled generation gives up like Dify's ``APP_MAX_EXECUTION_TIME`` (stops itself)."""
_YIELD_EVERY: Final = 256
"""An unpaced answer (``delay_ms`` 0) still hands the loop over this often, so its stream
starts at once instead of after the whole generation."""
FLOW_SCENARIOS: Final = frozenset({"chatflow_human"})
"""Chat scenarios played by the workflow walker (they pause)."""


# --------------------------------------------------------------------------- sends


def _validation(model: str, problems: list[str]) -> ValueError:
    count = f"{len(problems)} validation error{'s' if len(problems) > 1 else ''}"
    return ValueError(f"{count} for {model}\n" + "\n".join(problems))


@dataclass(frozen=True, slots=True)
class SendPayload:
    """The body of any of the three generation routes."""

    query: str
    inputs: dict[str, Any]
    user: str
    streaming: bool
    conversation_id: str | None
    files: list[Any]
    auto_generate_name: bool = True
    """False: a new conversation stays unnamed until renamed (chat only)."""
    workflow_id: str | None = None
    """A chatflow's pinned published version (chat only)."""

    @classmethod
    def parse(cls, body: Mapping[str, Any], route: Kind) -> SendPayload:
        """Validate like Dify: the ``user`` check first, then the pydantic-style field errors.

        Raises ValueError, which the endpoint turns into 400 ``invalid_param`` as Dify does.
        ``query`` is required for chat, optional (default "") for completion, absent for
        workflows; ``conversation_id`` only exists for chat.
        """
        user = body.get("user")
        if not isinstance(user, str) or not user:
            raise ValueError(USER_REQUIRED)
        problems: list[str] = []
        query, inputs = body.get("query", "" if route != "chat" else None), body.get("inputs")
        if route == "chat" and "query" not in body:
            problems.append("query\n  Field required [type=missing]")
        elif route != "workflow" and not isinstance(query, str):
            problems.append("query\n  Input should be a valid string [type=string_type]")
        if "inputs" not in body:
            problems.append("inputs\n  Field required [type=missing]")
        elif not isinstance(inputs, dict):
            problems.append("inputs\n  Input should be a valid dictionary [type=dict_type]")
        conversation_id = body.get("conversation_id") if route == "chat" else None
        if conversation_id is not None and not isinstance(conversation_id, str):
            problems.append("conversation_id\n  Input should be a valid string [type=string_type]")
        files = body.get("files")
        if files is not None and not isinstance(files, list):
            problems.append("files\n  Input should be a valid list [type=list_type]")
        auto_name = body.get("auto_generate_name", True) if route == "chat" else True
        if not isinstance(auto_name, bool):
            problems.append(
                "auto_generate_name\n  Input should be a valid boolean [type=bool_type]"
            )
        workflow_id = body.get("workflow_id") if route == "chat" else None
        if workflow_id is not None and not isinstance(workflow_id, str):
            problems.append("workflow_id\n  Input should be a valid string [type=string_type]")
        if problems:
            model = {
                "chat": "ChatRequestPayload",
                "completion": "CompletionRequestPayload",
                "workflow": "WorkflowRunPayload",
            }[route]
            raise _validation(model, problems)
        assert isinstance(inputs, dict)
        return cls(
            query=query if isinstance(query, str) else "",
            inputs=inputs,
            user=user,
            streaming=body.get("response_mode") == "streaming",
            conversation_id=conversation_id or None,
            files=files or [],
            auto_generate_name=auto_name,
            workflow_id=workflow_id or None,
        )


# --------------------------------------------------------------------------- the engine


class Engine:
    """Starts generations and walks them; one per simulator, over its store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def abort(self) -> None:
        """Cut open streams and cancel running generations: a Dify process going away."""
        for generation in self.store.generations.values():
            if generation.task is not None and not generation.task.done():
                generation.queue.put_nowait(Signal.DROP)
                if generation.run is not None:
                    for listener in generation.run.listeners:
                        listener.queue.put_nowait(Signal.DROP)
                generation.task.cancel()

    async def shutdown(self) -> None:
        """Cancel generations nobody stopped (a stall would otherwise linger)."""
        generations = self.store.generations.values()
        tasks = [g.task for g in generations if g.task and not g.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _conversation(
        self, app: AppSpec, payload: SendPayload, conversation: Conversation | None, listed: bool
    ) -> Conversation:
        now = int(time.time())
        if conversation is None:
            conversation = Conversation(
                id=str(uuid.uuid4()),
                app=app.name,
                user=payload.user,
                name=(payload.query.strip()[:40] or "New conversation")
                if payload.auto_generate_name
                else "",
                inputs=payload.inputs,
                created_at=now,
                updated_at=now,
                order=next(self.store.order),
                introduction="" if app.classic else app.opening_statement,
                listed=listed,
                variables=_default_variables(now),
            )
            self.store.conversations[conversation.id] = conversation
        conversation.updated_at, conversation.order = now, next(self.store.order)
        return conversation

    def start(
        self,
        app: AppSpec,
        kind: Kind,
        payload: SendPayload,
        controls: SimControls,
        conversation: Conversation | None = None,
    ) -> Generation:
        now = int(time.time())
        ids = StreamIds(str(uuid.uuid4()), str(uuid.uuid4()), "", now)
        message = None
        if kind != "workflow":
            conversation = self._conversation(app, payload, conversation, kind == "chat")
            ids = dataclasses.replace(ids, conversation_id=conversation.id)
            previous = conversation.messages[-1].id if conversation.messages else None
            message = Message(
                ids.message_id, ids.task_id, conversation.id, payload.query, payload.inputs, now
            )
            message.parent_message_id = previous
            conversation.messages.append(message)
        ping = controls.ping_interval_s
        generation = Generation(
            ids=ids,
            app=app,
            kind=kind,
            user=payload.user,
            query=payload.query,
            controls=controls,
            ping_interval_s=ping if ping is not None else self.store.config.ping_interval_s,
            started=asyncio.get_running_loop().time(),
            message=message,
        )
        if kind == "completion":
            generation.shape = as_completion_event
        flow = kind == "workflow" or controls.scenario in FLOW_SCENARIOS
        if flow or controls.scenario == "chatflow":
            generation.run = self._new_run(generation, payload.inputs)
        if flow:
            generation.flow_now = time.time()
            steps: list[FlowStep] = build_flow(
                ids,
                "workflow" if kind == "workflow" else "chatflow",
                payload.inputs,
                controls,
                self.store.config,
                query=payload.query,
                form_token=secrets.token_urlsafe(16),
                now=generation.flow_now,
            )
        else:
            steps = list(
                build_script(ids, payload.query, payload.inputs, controls, self.store.config)
            )
        self.store.generations[ids.task_id] = generation
        generation.active = True
        self.store.begin_active(app)
        generation.task = asyncio.create_task(
            self._generate(generation, steps), name=f"tw-sim-{ids.task_id}"
        )
        return generation

    def _new_run(self, generation: Generation, inputs: Mapping[str, Any]) -> Run:
        run = Run(
            id=run_id_of(generation.ids),
            app=generation.app.name,
            user=generation.user,
            task_id=generation.ids.task_id,
            kind="workflow" if generation.kind == "workflow" else "chatflow",
            inputs={k: v for k, v in inputs.items() if k != "tw_sim"},
            created_at=generation.ids.created_at,
            order=next(self.store.order),
        )
        self.store.runs[run.id] = run
        return run

    def _send(self, generation: Generation, item: bytes | Signal) -> None:
        """To the first response while it is open, and to every ``/events`` listener."""
        if generation.primary_open:
            generation.queue.put_nowait(item)
        run = generation.run
        if run is not None:
            for listener in run.listeners:
                listener.queue.put_nowait(item)
            if item is Signal.END:
                run.listeners.clear()

    def _emit(self, generation: Generation, step: Emit) -> None:
        """Apply one event to the stored message and run, then send its frame."""
        event = generation.shape(step.event)
        name = step.name
        message = generation.message
        if message is not None:
            if step.replace is not None:
                message.replace_answer(step.replace)
            else:
                message.append_answer(step.append)
        if step.is_token:
            generation.completion_tokens += 1
        if message is not None:
            _apply_to_message(message, name, event)
        if name == "message_end":
            generation.metadata = event["metadata"]
        elif name == "error":
            generation.error = {k: event[k] for k in ("code", "message", "status")}
        frame = encode_event(event, self.store.config.json_style)
        run = generation.run
        if run is not None:
            _apply_to_run(run, name, event, frame)
        self._send(generation, frame)

    def _release(self, generation: Generation) -> None:
        if generation.active:
            generation.active = False
            self.store.end_active(generation.app)

    async def _generate(self, generation: Generation, steps: list[FlowStep]) -> None:
        """Walk the script; a stop (or the stall giving up) ends it as Dify does."""
        try:
            # A deque: popping the head of a list moves every step behind it (quadratic in a
            # 100,000-token answer).
            pending = deque(steps)
            unpaced = 0
            while pending:
                step = pending.popleft()
                if isinstance(step, Emit):
                    if step.delay_s <= 0:
                        unpaced += 1
                        if unpaced % _YIELD_EVERY == 0:
                            await asyncio.sleep(0)  # let the response send what is queued
                    if await generation.sleep_or_stop(step.delay_s):
                        break
                    self._emit(generation, step)
                elif isinstance(step, Pause):
                    rest = await self._pause(generation, step)
                    if rest is None:
                        break
                    pending.extendleft(reversed(rest))
                elif isinstance(step, Drop):
                    self._send(generation, Signal.DROP)
                else:
                    self._send(generation, Signal.STALL)
                    await generation.sleep_or_stop(_MAX_STALL_S)
                    break
            else:
                return
            self._stopped(generation)
        finally:
            self._release(generation)
            self._send(generation, Signal.END)

    def _stopped(self, generation: Generation) -> None:
        """The frames Dify sends after a stop: the stream still ends normally."""
        message, run = generation.message, generation.run
        if message is not None and message.status not in ("generating", "paused"):
            return  # stopped after message_end (during TTS): nothing left to end
        if run is not None and run.over:
            return
        if message is not None:
            message.status = "stopped"
        loop = asyncio.get_running_loop()
        elapsed = loop.time() - generation.started
        if generation.kind == "workflow" or generation.controls.scenario in FLOW_SCENARIOS:
            events = stopped_flow_events(
                generation.ids,
                "workflow" if generation.kind == "workflow" else "chatflow",
                query=generation.query,
                completion_tokens=generation.completion_tokens,
                total_steps=run.total_steps if run else 0,
                elapsed_s=elapsed,
            )
        else:
            events = stopped_events(
                generation.ids,
                query=generation.query,
                scenario=generation.controls.scenario,
                answer=message.answer if message else "",
                completion_tokens=generation.completion_tokens,
                latency_s=elapsed,
            )
        for event in events:
            self._emit(generation, Emit(event))

    async def _pause(self, generation: Generation, pause: Pause) -> list[Step] | None:
        """Wait at a Human Input node: the first response ends, the stream slot is freed;
        the rest of the run comes once the form is answered or expires (None: stopped)."""
        run = generation.run
        assert run is not None and run.form_token is not None
        form = Form(
            token=run.form_token,
            app=generation.app.name,
            spec=pause.form,
            run=run,
            expires_at=generation.flow_now + pause.expires_in_s,
            expiration_time=math.ceil(generation.flow_now + pause.expires_in_s),
            outcome=asyncio.get_running_loop().create_future(),
        )
        run.form = self.store.forms[form.token] = form
        generation.queue.put_nowait(Signal.END)
        generation.primary_open = False
        for listener in [x for x in run.listeners if not x.continue_on_pause]:
            listener.queue.put_nowait(Signal.END)
            run.listeners.remove(listener)
        if generation.message is not None:
            generation.message.status = "paused"
        self._release(generation)
        stop: asyncio.Future[Any] = asyncio.ensure_future(generation.stop.wait())
        waiting: set[asyncio.Future[Any]] = {form.outcome, stop}
        try:
            timeout = max(0.0, form.expires_at - time.time())
            done, _ = await asyncio.wait(
                waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stop.cancel()
        if form.outcome in done:
            outcome = form.outcome.result()
        elif stop in done:
            form.outcome.cancel()
            return None
        else:
            form.outcome.cancel()
            outcome = TimedOut()
        generation.active = True
        self.store.begin_active(generation.app)
        if generation.message is not None:
            generation.message.status = "generating"
        run.status, run.replay_from = "running", len(run.frames)
        return pause.resume(outcome)


# --------------------------------------------------------------------------- pure helpers


def _default_variables(now: int) -> list[dict[str, Any]]:
    """A chatflow conversation's variables (ConversationVariableItem), fresh per conversation."""
    return [
        {
            "id": str(uuid.uuid4()),
            "name": name,
            "value_type": value_type,
            "value": value,
            "description": description,
            "created_at": now,
            "updated_at": now,
        }
        for name, value_type, value, description in (
            ("topic", "string", "", "What the conversation is about"),
            ("turns", "number", "0", "Questions asked so far"),
            ("preferences", "object", "{}", "What the user asked to remember"),
        )
    ]


def _apply_to_message(message: Message, name: str, event: Event) -> None:
    if name == "message_file":
        message.message_files.append(
            {
                "id": event["id"],
                "filename": f"{event['id']}.png",
                "type": event["type"],
                "url": event["url"],
                "mime_type": "image/png",
                "size": None,
                "transfer_method": "tool_file",
                "belongs_to": event["belongs_to"],
                "upload_file_id": None,
            }
        )
    elif name == "agent_thought":
        message.agent_thoughts[str(event["id"])] = {
            "id": event["id"],
            "chain_id": None,
            "message_id": message.id,
            "position": event["position"],
            "thought": event["thought"],
            "tool": event["tool"],
            "tool_labels": event["tool_labels"],
            "tool_input": event["tool_input"],
            "observation": event["observation"],
            "files": event["message_files"],
            "created_at": message.created_at,
        }
    elif name == "message_end":
        message.retriever_resources = event["metadata"]["retriever_resources"]
        message.usage = event["metadata"]["usage"]
        if message.status == "generating":
            message.status = "normal"
    elif name == "error":
        message.status, message.error = "error", str(event["message"])


def _apply_to_run(run: Run, name: str, event: Event, frame: bytes) -> None:
    if name == "human_input_required":
        run.replay_from = len(run.frames)
        run.form_token = str(event["data"]["form_token"])
    run.frames.append(frame)
    if name == "workflow_paused":
        run.status = "paused"
        run.total_steps = int(event["data"]["total_steps"])
    elif name == "node_finished":
        run.total_steps += 1
    elif name == "workflow_finished":
        data = event["data"]
        run.status = data["status"]
        run.outputs = data["outputs"]
        run.error = data["error"]
        run.total_tokens = data["total_tokens"]
        run.total_steps = data["total_steps"]
        run.elapsed_time = data["elapsed_time"]
        run.finished_at = data["finished_at"]
        run.final = frame
    elif name == "error" and not run.over:  # a chatflow's in-band error (no workflow_finished)
        run.status, run.error = "failed", str(event["message"])
        run.finished_at = run.created_at
        run.final = frame
