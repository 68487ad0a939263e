"""Workflow, chatflow-with-human-input and completion scripts (pure: no I/O, no clock).

How this works
--------------
:func:`build_flow` turns one workflow run (``POST /workflows/run``) or one chatflow message
that reaches a Human Input node into steps, like ``scenarios.build_script`` does for chats.
A run that pauses ends its first segment with a :class:`Pause`: the frames
``human_input_required`` and ``workflow_paused`` are already in the list before it, and
``Pause.resume(outcome)`` gives the rest of the run once the form is answered
(:class:`Filled`) or has expired (:class:`TimedOut`): ``human_input_form_filled`` /
``human_input_form_timeout``, the remaining nodes and text, ``workflow_finished``. The clock
and the form token come from the caller (``now``, ``form_token``), so a test can predict every
frame.

Frames follow NOTES.md §3c/§8 and Dify's OpenAPI description (``openapi_table.py``): a
workflow app's envelope is ``event, task_id, workflow_run_id``; a chatflow's is the chat
envelope (``event, conversation_id, message_id, created_at, task_id``) plus
``workflow_run_id``. A completion app's is ``event, task_id, message_id, created_at``
(:func:`as_completion_event`).

Text is derived from the run's inputs (``inputs["query"]`` when it is a string, else the
canonical JSON of the inputs without ``tw_sim``) with ``scenarios.answer_tokens``, so
:func:`expected_workflow_answer` is what a client must end up with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson

from tokenwire.simulator.scenarios import (
    DEFAULT_TOKENS,
    FAULT_ERROR_MESSAGE,
    WORKFLOW_ID,
    Emit,
    Event,
    Script,
    SimConfig,
    SimControls,
    Step,
    StreamIds,
    answer_tokens,
    apply_fault,
    chat_error_event,
    envelope,
    message_end_event,
    node_data,
    node_finished_fields,
    parse_controls,
    prompt_tokens,
)

__all__ = [
    "DEFAULT_FORM_EXPIRY_S",
    "DEFAULT_ITERATIONS",
    "Filled",
    "FlowKind",
    "FlowStep",
    "FormSpec",
    "Outcome",
    "Pause",
    "TimedOut",
    "as_completion_event",
    "build_flow",
    "emits_of",
    "expected_workflow_answer",
    "expected_workflow_outputs",
    "finished_data",
    "form_spec",
    "run_id_of",
    "stopped_flow_events",
    "workflow_seed",
]

FlowKind = Literal["workflow", "chatflow"]
DEFAULT_ITERATIONS: Final = 3
DEFAULT_FORM_EXPIRY_S: Final = 86_400.0
"""A form stays open a day unless ``tw_sim.form_expiry_s`` says otherwise (Dify's example)."""

_START: Final = ("start", "start", "Start")
_LLM: Final = ("llm", "llm", "LLM")
_END: Final = ("end", "end", "End")
_HUMAN: Final = ("human_input", "human-input", "Approval")
_ITERATION: Final = ("iteration", "iteration", "Iteration")
_LOOP: Final = ("loop", "loop", "Loop")
_INNER: Final = ("summarise", "code", "Summarise item")


# --------------------------------------------------------------------------- forms


@dataclass(frozen=True, slots=True)
class FormSpec:
    """A Human Input node's form (HumanInputFormDefinition without token and expiry)."""

    form_id: str
    node_id: str
    node_title: str
    form_content: str
    inputs: tuple[Mapping[str, Any], ...]
    actions: tuple[Mapping[str, str], ...]
    resolved_default_values: Mapping[str, Any]
    display_in_ui: bool = True

    def definition(self, form_token: str | None, expiration_time: int) -> dict[str, Any]:
        """``human_input_required.data``; the same fields describe a paused reason."""
        return {
            "form_id": self.form_id,
            "node_id": self.node_id,
            "node_title": self.node_title,
            "form_content": self.form_content,
            "inputs": [dict(item) for item in self.inputs],
            "actions": [dict(action) for action in self.actions],
            "display_in_ui": self.display_in_ui,
            "form_token": form_token,
            "resolved_default_values": dict(self.resolved_default_values),
            "expiration_time": expiration_time,
        }

    @property
    def action_ids(self) -> frozenset[str]:
        return frozenset(action["id"] for action in self.actions)

    def action_title(self, action_id: str) -> str:
        return next(a["title"] for a in self.actions if a["id"] == action_id)

    @property
    def required_inputs(self) -> tuple[str, ...]:
        return tuple(str(item["output_variable_name"]) for item in self.inputs)


def form_spec(ids: StreamIds, seed: str) -> FormSpec:
    """The approval form of the "human" and "chatflow_human" scenarios."""
    draft = seed.strip()[:60] or "the request"
    return FormSpec(
        form_id=ids.derive("form"),
        node_id=_HUMAN[0],
        node_title=_HUMAN[2],
        form_content=f"Please review the draft reply to: {draft}\n\n{{{{#$output.comment#}}}}",
        inputs=(
            {
                "type": "paragraph",
                "output_variable_name": "comment",
                "default": {"type": "constant", "selector": [], "value": ""},
            },
        ),
        actions=(
            {"id": "approve", "title": "Approve", "button_style": "primary"},
            {"id": "reject", "title": "Request changes", "button_style": "default"},
        ),
        resolved_default_values={"comment": ""},
    )


@dataclass(frozen=True, slots=True)
class Filled:
    """The form was submitted with ``action`` (one of its action ids) and ``inputs``."""

    action: str
    inputs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TimedOut:
    """The form expired before anyone answered it."""


Outcome = Filled | TimedOut


@dataclass(frozen=True, slots=True)
class Pause:
    """The run waits for ``form``; ``resume(outcome)`` is the rest of it."""

    form: FormSpec
    expires_in_s: float
    resume: Callable[[Outcome], list[Step]]


FlowStep = Step | Pause


# --------------------------------------------------------------------------- frames


def run_id_of(ids: StreamIds) -> str:
    """The ``workflow_run_id`` of a run (for a chatflow: of the message's run)."""
    return ids.derive("workflow_run")


def _frame(ids: StreamIds, kind: FlowKind, event: str, **fields: Any) -> Event:
    if kind == "chatflow":
        return envelope(ids, event, workflow_run_id=run_id_of(ids), **fields)
    return {"event": event, "task_id": ids.task_id, "workflow_run_id": run_id_of(ids), **fields}


def _node(
    ids: StreamIds, kind: FlowKind, event: str, index: int, node: tuple[str, str, str], **extra: Any
) -> Event:
    return _frame(ids, kind, event, data=node_data(ids, index, node, **extra))


def finished_data(
    ids: StreamIds,
    *,
    status: str,
    outputs: Mapping[str, Any] | None,
    total_tokens: int,
    total_steps: int,
    elapsed_s: float,
    error: str | None = None,
) -> dict[str, Any]:
    """``workflow_finished.data`` (WorkflowFinishedData), also a blocking run's ``data``."""
    run_id = run_id_of(ids)
    return {
        "id": run_id,
        "workflow_id": WORKFLOW_ID,
        "sequence_number": 1,
        "status": status,
        "outputs": dict(outputs) if outputs is not None else None,
        "error": error,
        "elapsed_time": round(elapsed_s, 6),
        "total_tokens": total_tokens,
        "total_steps": total_steps,
        "created_by": {"id": ids.derive("end_user"), "user": "end_user"},
        "created_at": ids.created_at,
        "finished_at": ids.created_at + int(elapsed_s),
        "exceptions_count": 0,
        "files": [],
    }


def workflow_seed(inputs: Mapping[str, Any]) -> str:
    """What a workflow's text is derived from: ``inputs.query``, else the inputs' JSON."""
    query = inputs.get("query")
    if isinstance(query, str):
        return query
    rest = {k: v for k, v in inputs.items() if k != "tw_sim"}
    return orjson.dumps(rest, option=orjson.OPT_SORT_KEYS).decode()


def _items(controls: SimControls) -> list[str]:
    count = controls.iterations if controls.iterations is not None else DEFAULT_ITERATIONS
    return [f"item {i}" for i in range(1, count + 1)]


def _text_seed(seed: str, outcome: Outcome | None) -> str:
    if outcome is None:
        return seed
    return f"{seed}\n[{outcome.action if isinstance(outcome, Filled) else 'timeout'}]"


def expected_workflow_answer(
    inputs: Mapping[str, Any],
    controls: SimControls | Mapping[str, Any] | None = None,
    *,
    tokens: int = DEFAULT_TOKENS,
    action: str | None = None,
    query: str | None = None,
) -> str:
    """The text a run streams (``text_chunk``; for a chatflow, ``message``), and its
    ``outputs.answer``. ``action`` is the human-input outcome (an action id, or "timeout");
    ``query`` is the chatflow message's query (a chatflow derives its text from it)."""
    controls = _controls(controls)
    count = controls.tokens if controls.tokens is not None else tokens
    seed = query if query is not None else workflow_seed(inputs)
    if action is not None:
        seed = f"{seed}\n[{action}]"
    return "".join(answer_tokens(seed, count))


def expected_workflow_outputs(
    inputs: Mapping[str, Any],
    controls: SimControls | Mapping[str, Any] | None = None,
    *,
    tokens: int = DEFAULT_TOKENS,
    action: str | None = None,
    query: str | None = None,
) -> dict[str, Any]:
    """``workflow_finished.data.outputs`` of a run that succeeded. Name the scenario in
    ``controls`` when it is the app's default (``app-workflow`` plays "iteration", whose
    outputs add ``items``); the text alone does not depend on it."""
    controls = _controls(controls)
    answer = expected_workflow_answer(inputs, controls, tokens=tokens, action=action, query=query)
    outputs: dict[str, Any] = {"answer": answer}
    if controls.scenario in ("iteration", "loop"):
        outputs["items"] = [f"summary of {item}" for item in _items(controls)]
    if controls.scenario in ("human", "chatflow_human"):
        outputs["action"] = action
    return outputs


def _controls(controls: SimControls | Mapping[str, Any] | None) -> SimControls:
    if isinstance(controls, SimControls):
        return controls
    raw = dict(controls or {})
    raw.setdefault("scenario", "workflow")
    return parse_controls("", {"tw_sim": raw})


# --------------------------------------------------------------------------- scripts


class _Flow:
    """One run's script under construction: frames, the node counter and the text so far."""

    def __init__(
        self,
        ids: StreamIds,
        kind: FlowKind,
        controls: SimControls,
        config: SimConfig,
        seed: str,
        query: str,
    ) -> None:
        delay_ms = controls.delay_ms if controls.delay_ms is not None else config.token_delay_ms
        first_ms = controls.first_token_delay_ms
        self.script = Script(
            ids, delay_ms / 1000, (delay_ms if first_ms is None else first_ms) / 1000
        )
        self.ids, self.kind, self.controls, self.config = ids, kind, controls, config
        self.seed, self.query = seed, query
        self.index = 0
        self.tokens = 0
        self.extra_outputs: dict[str, Any] = {}

    def frame(self, event: str, **fields: Any) -> Event:
        return _frame(self.ids, self.kind, event, **fields)

    def emit(self, event: Event) -> None:
        self.script.emit(event)

    def node(self, node: Any, outputs: Mapping[str, Any], **context: Any) -> None:
        """``node_started`` and ``node_finished`` of a node that just runs."""
        self.index += 1
        self.emit(_node(self.ids, self.kind, "node_started", self.index, node, **context))
        finished = node_finished_fields(dict(outputs))
        self.emit(
            _node(self.ids, self.kind, "node_finished", self.index, node, **finished, **context)
        )

    def started(self, inputs: Mapping[str, Any]) -> None:
        run_id = run_id_of(self.ids)
        shown = {**inputs, "sys.query": self.query} if self.kind == "chatflow" else dict(inputs)
        data = {
            "id": run_id,
            "workflow_id": WORKFLOW_ID,
            "sequence_number": 1,
            "inputs": shown,
            "created_at": self.ids.created_at,
            "reason": "initial",
        }
        self.emit(self.frame("workflow_started", data=data))
        self.node(_START, shown)

    def container(self, loop: bool) -> None:
        """An iteration (or loop) node over :func:`_items`, one inner node per round."""
        node = _LOOP if loop else _ITERATION
        prefix = "loop" if loop else "iteration"
        items = _items(self.controls)
        self.index += 1
        base = node_data(self.ids, self.index, node)
        head = {k: base[k] for k in ("id", "node_id", "node_type", "title", "created_at")}
        self.emit(
            self.frame(
                f"{prefix}_started",
                data={
                    **head,
                    "extras": {},
                    "metadata": {"iterator_length": len(items)} if not loop else {},
                    "inputs": {"iterator_selector": items} if not loop else {"items": items},
                    "inputs_truncated": False,
                },
            )
        )
        results: list[str] = []
        for round_index, item in enumerate(items):
            next_data: dict[str, Any] = {**head, "index": round_index, "extras": {}}
            if loop:
                next_data["pre_loop_output"] = results[-1] if results else None
            self.emit(self.frame(f"{prefix}_next", data=next_data))
            result = f"summary of {item}"
            context = {
                f"{prefix}_id": head["node_id"],
                "id": self.ids.derive(f"node:{_INNER[0]}:{round_index}"),
            }
            self.node(_INNER, {"result": result}, **context)
            results.append(result)
        self.emit(
            self.frame(
                f"{prefix}_completed",
                data={
                    **head,
                    "outputs": {"output": results},
                    "outputs_truncated": False,
                    "inputs": {"items": items},
                    "inputs_truncated": False,
                    "extras": {},
                    "status": "succeeded",
                    "error": None,
                    "elapsed_time": 0.01 * len(items),
                    "total_tokens": 0,
                    "execution_metadata": {"total_tokens": 0, "total_price": "0"},
                    "finished_at": self.ids.created_at,
                    "steps": len(items),
                },
            )
        )
        self.extra_outputs["items"] = results

    def llm(self, outcome: Outcome | None) -> str:
        """The LLM node: a reasoning summary, then the text deltas."""
        count = self.controls.tokens if self.controls.tokens is not None else self.config.tokens
        tokens = answer_tokens(_text_seed(self.seed, outcome), count)
        self.index += 1
        self.emit(_node(self.ids, self.kind, "node_started", self.index, _LLM))
        for reasoning, final in (("Drafting the answer.", False), ("", True)):
            data: dict[str, Any] = {"reasoning": reasoning, "node_id": _LLM[0], "is_final": final}
            if self.kind == "chatflow":
                data = {"message_id": self.ids.message_id, **data}
                self.emit(envelope(self.ids, "reasoning_chunk", data=data))
            else:
                self.emit(self.frame("reasoning_chunk", data=data))
        for text in tokens:
            if self.kind == "chatflow":
                self.script.token("message", text)
            else:
                selector = [_LLM[0], "text"]
                data = {"text": text, "from_variable_selector": selector}
                self.script.chunk(self.frame("text_chunk", data=data), text)
        answer = "".join(tokens)
        self.tokens += len(tokens)
        finished = node_finished_fields({"text": answer}, len(tokens))
        self.emit(_node(self.ids, self.kind, "node_finished", self.index, _LLM, **finished))
        return answer

    def finish(self, answer: str) -> None:
        outputs = {"answer": answer, **self.extra_outputs}
        if self.kind == "workflow":
            self.node(_END, outputs)
        data = finished_data(
            self.ids,
            status="succeeded",
            outputs=outputs,
            total_tokens=prompt_tokens(self.seed) + self.tokens,
            total_steps=self.index,
            elapsed_s=self.script.elapsed_s,
        )
        self.emit(self.frame("workflow_finished", data=data))
        if self.kind == "chatflow":
            self.emit(message_end_event(self.ids, self.query, self.tokens, self.script.elapsed_s))

    def error_event(self) -> Event:
        if self.kind == "chatflow":
            return chat_error_event(self.ids)
        return {
            **self.frame("error"),
            "status": 400,
            "code": "completion_request_error",
            "message": FAULT_ERROR_MESSAGE,
        }

    def faulty(self, steps: list[Step]) -> list[Step]:
        """Splice the run's fault in; an ``error_event`` run first finishes as "failed"
        (``workflow_finished`` then ``error``, as a failing Dify chatflow ends, NOTES §8)."""
        error = self.error_event()
        faulted = apply_fault(steps, self.controls, self.script.delay_s, error)
        if self.controls.fault != "error_event":
            return faulted
        done = faulted[:-1]
        tokens = sum(isinstance(s, Emit) and s.is_token for s in done)
        data = finished_data(
            self.ids,
            status="failed",
            outputs=None,
            total_tokens=prompt_tokens(self.seed) + tokens,
            total_steps=sum(isinstance(s, Emit) and s.name == "node_finished" for s in done),
            elapsed_s=self.script.elapsed_s,
            error=str(error["message"]),
        )
        return [*done, Emit(self.frame("workflow_finished", data=data)), faulted[-1]]


def build_flow(
    ids: StreamIds,
    kind: FlowKind,
    inputs: Mapping[str, Any],
    controls: SimControls,
    config: SimConfig,
    *,
    query: str = "",
    form_token: str = "",
    now: float = 0.0,
) -> list[FlowStep]:
    """Every step of one workflow run (``kind="workflow"``) or chatflow message
    (``kind="chatflow"``, scenario "chatflow_human"), faults included.

    ``now`` (epoch seconds) and ``form_token`` are only used by a run that pauses: they make
    the form's ``expiration_time`` and ``form_token``.
    """
    seed = query if kind == "chatflow" else workflow_seed(inputs)
    flow = _Flow(ids, kind, controls, config, seed, query)
    shown = {k: v for k, v in inputs.items() if k != "tw_sim"} or dict(inputs)
    flow.started(shown)
    if controls.scenario in ("iteration", "loop"):
        flow.container(loop=controls.scenario == "loop")
    if controls.scenario not in ("human", "chatflow_human"):
        flow.finish(flow.llm(None))
        return list(flow.faulty(flow.script.steps))

    form = form_spec(ids, seed)
    expiry = DEFAULT_FORM_EXPIRY_S if controls.form_expiry_s is None else controls.form_expiry_s
    expiration_time = math.ceil(now + expiry)
    flow.index += 1
    human_index = flow.index
    flow.emit(_node(ids, kind, "node_started", human_index, _HUMAN))
    definition = form.definition(form_token, expiration_time)
    flow.emit(flow.frame("human_input_required", data=definition))
    paused = {
        "workflow_run_id": run_id_of(ids),
        "paused_nodes": [form.node_id],
        "outputs": {},
        "reasons": [{"TYPE": "human_input_required", **definition}],
        "status": "paused",
        "created_at": ids.created_at,
        "elapsed_time": round(flow.script.elapsed_s, 6),
        "total_tokens": 0,
        "total_steps": flow.index,
    }
    flow.emit(flow.frame("workflow_paused", data=paused))
    before = list(flow.script.steps)
    mark = (flow.index, flow.tokens, flow.script.elapsed_s)

    def resume(outcome: Outcome) -> list[Step]:
        flow.script.steps.clear()
        flow.index, flow.tokens, flow.script.elapsed_s = mark
        if isinstance(outcome, Filled):
            submitted = dict(outcome.inputs)
            flow.emit(
                flow.frame(
                    "human_input_form_filled",
                    data={
                        "node_id": form.node_id,
                        "node_title": form.node_title,
                        "rendered_content": form.form_content.replace(
                            "{{#$output.comment#}}", str(submitted.get("comment", ""))
                        ),
                        "action_id": outcome.action,
                        "action_text": form.action_title(outcome.action),
                        "submitted_data": submitted,
                    },
                )
            )
            action = outcome.action
            human_outputs: dict[str, Any] = {**submitted, "__action_id": action}
        else:
            flow.emit(
                flow.frame(
                    "human_input_form_timeout",
                    data={
                        "node_id": form.node_id,
                        "node_title": form.node_title,
                        "expiration_time": expiration_time,
                    },
                )
            )
            action = "timeout"
            human_outputs = {"__action_id": action}
        finished = node_finished_fields(human_outputs)
        flow.emit(_node(ids, kind, "node_finished", human_index, _HUMAN, **finished))
        flow.extra_outputs["action"] = action
        flow.finish(flow.llm(outcome))
        return list(flow.faulty(flow.script.steps))

    return [*before, Pause(form, expiry, resume)]


def stopped_flow_events(
    ids: StreamIds,
    kind: FlowKind,
    *,
    query: str,
    completion_tokens: int,
    total_steps: int,
    elapsed_s: float,
) -> list[Event]:
    """What Dify sends after a workflow stop: ``workflow_finished`` with status "stopped"
    (and, for a chatflow, ``message_end``)."""
    data = finished_data(
        ids,
        status="stopped",
        outputs={},
        total_tokens=completion_tokens,
        total_steps=total_steps,
        elapsed_s=elapsed_s,
    )
    events = [_frame(ids, kind, "workflow_finished", data=data)]
    if kind == "chatflow":
        events.append(message_end_event(ids, query, completion_tokens, elapsed_s))
    return events


def as_completion_event(event: Event) -> Event:
    """A chat frame as a completion app sends it: no ``conversation_id``; ``message_end``
    gains ``files`` (CompletionStreamEventBase, StreamEventMessageEnd)."""
    shaped = {k: v for k, v in event.items() if k != "conversation_id"}
    if shaped.get("event") == "message_end":
        shaped["files"] = []
    return shaped


def emits_of(steps: Sequence[FlowStep]) -> list[Emit]:
    """The frames of a segment (tests and the app read them)."""
    return [step for step in steps if isinstance(step, Emit)]
