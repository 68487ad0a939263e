"""Runs that wait for a human: keeping the pause, taking the answer, stopping while waiting.

The rules are in the core (``shared/human_input.py``: the record and its transition table);
this module reads and writes the record through :class:`~worker.types.PausedRuns` and submits
the answer to Dify as the request's own user:

* :meth:`HumanInput.keep` — the runner's ``on_forms``: the pause (job, form and token) is
  written before the client sees the form;
* :meth:`HumanInput.answer` — an ``input`` frame, from any gateway: no pause under the user's
  key is ``not_found`` (nothing reaches Dify); else the form must still be open at Dify
  (``GET /form/human_input/{token}``), the answer is kept and the job put back to follow the
  run (also when Dify says the form expired: the run went on without it);
* :meth:`HumanInput.submit` — the follower, listening to the run's events, submits the kept
  answer (``POST /form/human_input/{token}`` as the request's user);
* :meth:`HumanInput.stop` — a ``stop`` for a request no worker runs: if it waits, the job is put
  back and its delivery, seeing the recorded stop, stops the run at Dify and closes it;
* the form's expiry: the worker that kept the form puts the job back :data:`EXPIRY_LEAD_S`
  before the form expires, unanswered, so the follower listens when Dify goes on without the
  answer (``human_input_form_timeout``). Best effort: if that worker is gone by then, the
  owner's next ``input`` (``form_expired``) or ``stop`` does it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

from shared.dify_api import DifyIds, form_body
from shared.exceptions import ErrorCode, FormClosed, InternalError, NotFound, TokenwireError
from shared.human_input import InputRequest, Pause, PauseState, input_reply
from shared.jobs import Job
from shared.mapping import PendingForm
from worker.types import PausedRuns, RunEventsApi

__all__ = ["HumanInput", "answer_input", "refusal"]

log = logging.getLogger("tokenwire.worker")

#: How long before a form expires the job is put back to follow what Dify does then (the
#: follower must be listening when Dify goes on; an answer this late is ``form_expired``).
EXPIRY_LEAD_S: Final = 10.0


class HumanInput:
    def __init__(self, runs: PausedRuns, dify: RunEventsApi) -> None:
        self.runs = runs
        self.dify = dify
        self._expiries: set[asyncio.Task[None]] = set()

    async def keep(self, job: Job, ids: DifyIds, forms: list[PendingForm]) -> None:
        """Keep the newest form Dify sent for ``job`` (a run waits on one form at a time)."""
        form = forms[-1]
        pause = Pause(
            job=job.model_copy(update={"continued": 0}),
            form_id=form.form_id,
            form_token=form.form_token,
            node_id=form.node_id,
            expiration_time=form.expiration_time,
            workflow_run_id=ids.workflow_run_id,
            task_id=ids.task_id,
            continued=job.continued,
        )
        await self.runs.save_pause(job.key, pause.to_bytes())
        if form.expiration_time is not None:
            task = asyncio.get_running_loop().create_task(
                self._expire_at(job.key, form.form_id, form.expiration_time)
            )
            self._expiries.add(task)
            task.add_done_callback(self._expiries.discard)

    async def _expire_at(self, key: str, form_id: str, expiration_time: int) -> None:
        await asyncio.sleep(max(0.0, expiration_time - EXPIRY_LEAD_S - time.time()))
        try:
            loaded = await self._load(key)
            if loaded is None or loaded[0].form_id != form_id:
                return
            pause, revision = loaded
            if pause.state is PauseState.WAITING and await self._continue(pause, revision, None):
                log.info("form about to expire unanswered; the run is followed", extra={"key": key})
        except TokenwireError as exc:
            log.warning("cannot follow a form's expiry", extra={"error": str(exc)})

    async def _load(self, key: str) -> tuple[Pause, int] | None:
        found = await self.runs.load_pause(key)
        if found is None:
            return None
        pause = Pause.from_bytes(found[0])
        return (pause, found[1]) if pause is not None else None

    async def answer(self, request: InputRequest) -> None:
        """Submit a human's answer; raises ``not_found``, ``form_expired``, ``form_submitted``
        or Dify's error."""
        loaded = await self._load(request.key)
        if loaded is None or loaded[0].form_id != request.form_id:
            raise NotFound("this request waits for no such form")
        pause, revision = loaded
        if pause.state is PauseState.ANSWERED and pause.answer is None:
            raise FormClosed("the form has expired", code=ErrorCode.FORM_EXPIRED)
        if pause.state is not PauseState.WAITING:
            raise FormClosed("the form was already answered", code=ErrorCode.FORM_SUBMITTED)
        job = pause.job
        trace = request.trace_id or job.trace_id
        try:
            await self.dify.check_form(pause.form_token, trace_id=trace, app=job.app)
        except FormClosed as exc:
            if exc.code is ErrorCode.FORM_EXPIRED:
                await self._continue(pause, revision, None)  # Dify went on without it
            raise
        answer = {"inputs": request.inputs, "action": request.action}
        if not await self._continue(pause, revision, answer):
            raise FormClosed("the form was already answered", code=ErrorCode.FORM_SUBMITTED)
        log.info("form answered; the run continues", extra={"key": request.key})

    async def pending_answer(self, job: Job) -> tuple[Pause, dict[str, Any]] | None:
        """The answer this copy of ``job`` must submit once it listens to the run."""
        loaded = await self._load(job.key)
        if loaded is None:
            return None
        answer = loaded[0].answer_for(job)
        return (loaded[0], answer) if answer is not None else None

    async def submit(self, pause: Pause, answer: dict[str, Any]) -> None:
        """Submit the kept answer as the request's own user (Dify: first submit wins)."""
        job = pause.job
        inputs = answer.get("inputs")
        body = form_body(
            inputs if isinstance(inputs, dict) else {}, str(answer.get("action")), job.user
        )
        try:
            await self.dify.submit_form(pause.form_token, body, trace_id=job.trace_id, app=job.app)
        except TokenwireError as exc:
            # Submitted before (this copy died after it), or expired meanwhile: the run goes
            # on at Dify either way, and its events tell the client what happened.
            log.warning("the kept answer was not taken", extra={"error": str(exc)})

    async def stop(self, key: str) -> bool:
        """Stop the run if it waits for a human; whether it did."""
        loaded = await self._load(key)
        if loaded is None or loaded[0].state is not PauseState.WAITING:
            return False
        pause, revision = loaded
        if not await self.runs.update_pause(key, pause.move("stop").to_bytes(), revision):
            return False  # answered or stopped meanwhile
        await self.runs.put_back(pause.next_job(), pause.next_msg_id())
        log.info("stop of a run waiting for a human", extra={"key": key})
        return True

    async def _continue(self, pause: Pause, revision: int, answer: dict[str, Any] | None) -> bool:
        """Answered: keep the answer and put the job back, once (the compare-and-set decides
        who does); whether this call did."""
        key = pause.job.key
        moved = pause.move("answer", answer)
        if not await self.runs.update_pause(key, moved.to_bytes(), revision):
            return False
        await self.runs.put_back(moved.next_job(), moved.next_msg_id())
        return True


def refusal(exc: BaseException) -> TokenwireError:
    """What a client hears when an answer could not be handled."""
    if isinstance(exc, TokenwireError):
        return exc
    return InternalError("tokenwire could not hand the answer to Dify")


async def answer_input(human: HumanInput | None, data: bytes) -> bytes:
    """The reply to one ``input`` from a gateway (:func:`shared.human_input.input_reply`)."""
    try:
        if human is None:
            raise InternalError("this worker does not serve human input")
        request = InputRequest.from_bytes(data)
        await human.answer(request)
    except TokenwireError as exc:
        return input_reply(exc)
    except Exception as exc:
        log.exception("an answer to a form failed")
        return input_reply(refusal(exc))
    return input_reply()
