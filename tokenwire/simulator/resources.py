"""The simulator's request/response endpoints: conversations, messages, feedback, suggestions,
files, audio, app metadata, workflow run details and logs, human-input forms (NOTES §6, §8).

How this works
--------------
Every endpoint goes through :meth:`Resources._enter`: record the call (``/_sim/calls``, never
the key), apply an outage (app metadata is spared, as before) or a scripted fault
(``/_sim/faults``, any path), check the key and the app's mode, then answer from the
:class:`~tokenwire.simulator.state.Store` with Dify's shapes and errors. Scoping is Dify's:
conversations and messages by (app, user); files by app for previews but by uploader for use
in a send; runs, logs and forms app-wide.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Final

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tokenwire.simulator.apps import AppSpec, app_info, app_meta, app_parameters, app_site
from tokenwire.simulator.media import (
    AUDIO_EXTENSIONS,
    AUDIO_LIMIT_BYTES,
    AUDIO_MIME_TYPES,
    file_category,
    speech_of,
    suggested_questions,
    transcript_of,
)
from tokenwire.simulator.multipart import MultipartError, Part, parse_form
from tokenwire.simulator.responses import (
    USER_REQUIRED,
    bad_request,
    error,
    invalid,
    is_uuid,
    json_response,
    loads_object,
    not_found,
    query_int,
)
from tokenwire.simulator.state import Conversation, Form, Store, UploadedFile
from tokenwire.simulator.workflows import Filled

__all__ = ["Resources"]

_MB: Final = 1024 * 1024
_MODE_MISMATCH: Final = "Please check if your app mode matches the right API route."
_CONVERSATION_GONE: Final = "Conversation Not Exists."
_MESSAGE_GONE: Final = "Message Not Exists."
_FORM_GONE: Final = "Form not found"

Check = Callable[[AppSpec], Response | None]


def _chat_only(app: AppSpec) -> Response | None:
    return None if app.is_chat else error(400, "not_chat_app", _MODE_MISMATCH)


def _variables_apps(app: AppSpec) -> Response | None:
    ok = app.mode in ("chat", "agent-chat", "advanced-chat")
    return None if ok else error(400, "not_chat_app", _MODE_MISMATCH)


def _feedback_apps(app: AppSpec) -> Response | None:
    ok = app.is_chat or app.mode == "completion"
    return None if ok else error(400, "not_chat_app", _MODE_MISMATCH)


def _workflow_apps(app: AppSpec) -> Response | None:
    return None if app.has_workflow else error(400, "not_workflow_app", _MODE_MISMATCH)


def _user_of(request: Request, body: dict[str, Any] | None) -> str:
    if body is not None and isinstance(body.get("user"), str):
        return str(body["user"])
    return request.query_params.get("user", "")


def _typed(value_type: str, value: Any) -> str | None:
    """The stored (string) form of a variable's new value, or None on a type mismatch."""
    if value_type == "string":
        return value if isinstance(value, str) else None
    if value_type == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return orjson.dumps(value).decode() if ok else None
    if value_type == "object":
        return orjson.dumps(value).decode() if isinstance(value, dict) else None
    return orjson.dumps(value).decode() if isinstance(value, list) else None


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    return "array" if isinstance(value, list) else "null"


class Resources:
    """The endpoints of this module, bound to one store."""

    def __init__(
        self,
        store: Store,
        *,
        outage: Callable[[], str | None],
        fail: Callable[..., Response],
    ) -> None:
        self.store = store
        self._outage = outage
        self._fail = fail

    def routes(self) -> list[Route]:
        return [
            Route("/v1/conversations", self.api_conversations, methods=["GET"]),
            Route("/v1/conversations/{conversation_id}", self.api_delete, methods=["DELETE"]),
            Route("/v1/conversations/{conversation_id}/name", self.api_rename, methods=["POST"]),
            Route(
                "/v1/conversations/{conversation_id}/variables",
                self.api_variables,
                methods=["GET"],
            ),
            Route(
                "/v1/conversations/{conversation_id}/variables/{variable_id}",
                self.api_set_variable,
                methods=["PUT"],
            ),
            Route("/v1/messages", self.api_messages, methods=["GET"]),
            Route("/v1/messages/{message_id}/feedbacks", self.api_feedback, methods=["POST"]),
            Route("/v1/messages/{message_id}/suggested", self.api_suggested, methods=["GET"]),
            Route("/v1/files/upload", self.api_upload, methods=["POST"]),
            Route("/v1/files/{file_id}/preview", self.api_preview, methods=["GET"]),
            Route("/v1/audio-to-text", self.api_audio_to_text, methods=["POST"]),
            Route("/v1/text-to-audio", self.api_text_to_audio, methods=["POST"]),
            Route("/v1/info", self.api_info, methods=["GET"]),
            Route("/v1/parameters", self.api_parameters, methods=["GET"]),
            Route("/v1/meta", self.api_meta, methods=["GET"]),
            Route("/v1/site", self.api_site, methods=["GET"]),
        ]

    # ----------------------------------------------------------------------- prologue

    def _enter(
        self,
        request: Request,
        body: dict[str, Any] | None,
        check: Check | None = None,
        *,
        metadata: bool = False,
    ) -> AppSpec | Response:
        """Record, fault, authenticate, check the mode: what every endpoint does first."""
        app = self.store.app_for(request)
        self.store.calls.append(
            {
                "method": request.method,
                "path": request.url.path,
                "app": app.name if isinstance(app, AppSpec) else None,
                "user": _user_of(request, body),
                "query": dict(request.query_params),
                "body": body,
            }
        )
        # An outage spares app metadata (as it always did); a scripted fault does not.
        fault = (None if metadata else self._outage()) or self.store.take_fault(request.url.path)
        if fault is not None:
            return self._fail(fault)
        if not isinstance(app, AppSpec):
            return app
        if check is not None and (refused := check(app)) is not None:
            return refused
        return app

    async def _json_body(self, request: Request) -> dict[str, Any] | None:
        return loads_object(await request.body())

    # ----------------------------------------------------------------------- app metadata

    async def api_info(self, request: Request) -> Response:
        """``GET /v1/info``."""
        app = self._enter(request, None, metadata=True)
        return app if isinstance(app, Response) else json_response(app_info(app))

    async def api_parameters(self, request: Request) -> Response:
        """``GET /v1/parameters``: what a frontend reads to render the app (NOTES §6)."""
        app = self._enter(request, None, metadata=True)
        return app if isinstance(app, Response) else json_response(app_parameters(app))

    async def api_meta(self, request: Request) -> Response:
        """``GET /v1/meta``."""
        app = self._enter(request, None, metadata=True)
        return app if isinstance(app, Response) else json_response(app_meta(app))

    async def api_site(self, request: Request) -> Response:
        """``GET /v1/site``."""
        app = self._enter(request, None, metadata=True)
        return app if isinstance(app, Response) else json_response(app_site(app))

    # ----------------------------------------------------------------------- conversations

    async def api_conversations(self, request: Request) -> Response:
        """``GET /v1/conversations``: the user's conversations, newest activity first."""
        app = self._enter(request, None, _chat_only)
        if isinstance(app, Response):
            return app
        user = request.query_params.get("user", "")
        if not user:
            return invalid(USER_REQUIRED)
        try:
            limit = query_int(request, "limit", 20, 1, 100)
        except ValueError as exc:
            return invalid(str(exc))
        sort_by = request.query_params.get("sort_by", "-updated_at")
        keys: dict[str, Callable[[Conversation], int]] = {
            "created_at": lambda c: c.created_at,
            "updated_at": lambda c: c.order,
        }
        if sort_by.lstrip("-") not in keys:
            return invalid("sort_by must be created_at, -created_at, updated_at or -updated_at")
        owned = sorted(
            (
                c
                for c in self.store.conversations.values()
                if c.app == app.name and c.user == user and c.listed
            ),
            key=keys[sort_by.lstrip("-")],
            reverse=sort_by.startswith("-"),
        )
        last_id = request.query_params.get("last_id")
        if last_id:
            index = next((i for i, c in enumerate(owned) if c.id == last_id), None)
            if index is None:
                return not_found("Last Conversation Not Exists.")
            owned = owned[index + 1 :]
        return json_response(
            {
                "limit": limit,
                "has_more": len(owned) > limit,
                "data": [c.as_dict() for c in owned[:limit]],
            }
        )

    def _owned(self, app: AppSpec, request: Request, user: str) -> Conversation | Response:
        if not user:
            return invalid(USER_REQUIRED)
        conversation_id = str(request.path_params["conversation_id"])
        found = self.store.conversation(app, conversation_id, user)
        return found if found is not None else not_found(_CONVERSATION_GONE)

    async def api_rename(self, request: Request) -> Response:
        """``POST /v1/conversations/{id}/name``: ``name``, or ``auto_generate`` from the
        first question."""
        body = await self._json_body(request) or {}
        app = self._enter(request, body, _chat_only)
        if isinstance(app, Response):
            return app
        conversation = self._owned(app, request, _user_of(request, body))
        if isinstance(conversation, Response):
            return conversation
        name, auto = body.get("name"), body.get("auto_generate", False)
        if not isinstance(auto, bool):
            return invalid("auto_generate must be a boolean")
        if auto:
            if not conversation.messages:
                return invalid("")
            first = conversation.messages[0].query.strip().split("\n")[0]
            conversation.name = (first[:30] or "New conversation").strip()
        elif isinstance(name, str) and name.strip():
            conversation.name = name.strip()
        else:
            return invalid("name is required when auto_generate is false")
        conversation.updated_at = int(time.time())
        return json_response(conversation.as_dict())

    async def api_delete(self, request: Request) -> Response:
        """``DELETE /v1/conversations/{id}``: 204, and the conversation is gone for good."""
        body = await self._json_body(request) or {}
        app = self._enter(request, body, _chat_only)
        if isinstance(app, Response):
            return app
        conversation = self._owned(app, request, _user_of(request, body))
        if isinstance(conversation, Response):
            return conversation
        del self.store.conversations[conversation.id]
        return Response(status_code=204)

    async def api_variables(self, request: Request) -> Response:
        """``GET /v1/conversations/{id}/variables`` (chatflow conversation variables)."""
        app = self._enter(request, None, _variables_apps)
        if isinstance(app, Response):
            return app
        conversation = self._owned(app, request, request.query_params.get("user", ""))
        if isinstance(conversation, Response):
            return conversation
        try:
            limit = query_int(request, "limit", 20, 1, 100)
        except ValueError as exc:
            return invalid(str(exc))
        variables = conversation.variables
        name = request.query_params.get("variable_name")
        if name:
            variables = [v for v in variables if v["name"] == name]
        last_id = request.query_params.get("last_id")
        if last_id:
            index = next((i for i, v in enumerate(variables) if v["id"] == last_id), None)
            if index is None:
                return invalid("")
            variables = variables[index + 1 :]
        return json_response(
            {"limit": limit, "has_more": len(variables) > limit, "data": variables[:limit]}
        )

    async def api_set_variable(self, request: Request) -> Response:
        """``PUT /v1/conversations/{id}/variables/{variable_id}`` with ``{value, user}``."""
        body = await self._json_body(request) or {}
        app = self._enter(request, body, _variables_apps)
        if isinstance(app, Response):
            return app
        conversation = self._owned(app, request, _user_of(request, body))
        if isinstance(conversation, Response):
            return conversation
        variable_id = str(request.path_params["variable_id"])
        variable = next((v for v in conversation.variables if v["id"] == variable_id), None)
        if variable is None:
            return not_found("Conversation Variable Not Exists.")
        if "value" not in body:
            return invalid("value\n  Field required [type=missing]")
        value = body["value"]
        stored = _typed(str(variable["value_type"]), value)
        if stored is None:
            return bad_request(
                f"Type mismatch: variable '{variable['name']}' expects "
                f"{variable['value_type']}, but got {_type_name(value)} type"
            )
        variable["value"], variable["updated_at"] = stored, int(time.time())
        return json_response(variable)

    # ----------------------------------------------------------------------- messages

    async def api_messages(self, request: Request) -> Response:
        """``GET /v1/messages``: latest page first, older pages by ``first_id`` (as Dify)."""
        app = self._enter(request, None, _chat_only)
        if isinstance(app, Response):
            return app
        params = request.query_params
        user, conversation_id = params.get("user", ""), params.get("conversation_id", "")
        if not user:
            return invalid(USER_REQUIRED)
        try:
            limit = query_int(request, "limit", 20, 1, 100)
        except ValueError as exc:
            return invalid(str(exc))
        if not is_uuid(conversation_id):
            return invalid("conversation_id must be a valid UUID")
        conversation = self.store.conversation(app, conversation_id, user)
        if conversation is None:
            return not_found(_CONVERSATION_GONE)
        older = conversation.messages
        first_id = params.get("first_id")
        if first_id:
            index = next((i for i, m in enumerate(older) if m.id == first_id), None)
            if index is None:
                return not_found("First Message Not Exists.")
            older = older[:index]
        page = older[-limit:]
        return json_response(
            {"limit": limit, "has_more": len(older) > limit, "data": [m.as_dict() for m in page]}
        )

    async def api_feedback(self, request: Request) -> Response:
        """``POST /v1/messages/{id}/feedbacks``: ``rating`` like, dislike or null (revoke)."""
        body = await self._json_body(request) or {}
        app = self._enter(request, body, _feedback_apps)
        if isinstance(app, Response):
            return app
        user = _user_of(request, body)
        if not user:
            return invalid(USER_REQUIRED)
        rating, content = body.get("rating"), body.get("content")
        if rating not in ("like", "dislike", None):
            return invalid("rating must be like, dislike or null")
        if content is not None and not isinstance(content, str):
            return invalid("content must be a string")
        message = self.store.message(app, str(request.path_params["message_id"]), user)
        if message is None:
            return not_found(_MESSAGE_GONE)
        if rating is None:
            if message.feedback is None:
                return invalid("rating cannot be null when there is no feedback to revoke")
            message.feedback = None
        else:
            message.feedback = {"rating": rating, "content": content}
        return json_response({"result": "success"})

    async def api_suggested(self, request: Request) -> Response:
        """``GET /v1/messages/{id}/suggested``: 400 when the app has the feature off."""
        app = self._enter(request, None, _chat_only)
        if isinstance(app, Response):
            return app
        user = request.query_params.get("user", "")
        if not user:
            return invalid(USER_REQUIRED)
        message = self.store.message(app, str(request.path_params["message_id"]), user)
        if message is None:
            return not_found(_MESSAGE_GONE)
        if not app.suggested_questions_after_answer:
            return bad_request("Suggested Questions Is Disabled.")
        return json_response({"result": "success", "data": suggested_questions(message.query)})

    # ----------------------------------------------------------------------- files and audio

    async def _parts(self, request: Request) -> list[Part] | Response:
        content_type = request.headers.get("content-type", "")
        try:
            return parse_form(content_type, await request.body())
        except MultipartError as exc:
            return bad_request(f"Invalid multipart/form-data: {exc}")

    @staticmethod
    def _summary(parts: list[Part]) -> dict[str, Any]:
        """What ``/_sim/calls`` records of a multipart body (never the bytes)."""
        summary: dict[str, Any] = {}
        for part in parts:
            if part.filename is None:
                summary[part.name] = part.text
            else:
                summary[part.name] = {
                    "filename": part.filename,
                    "content_type": part.content_type,
                    "size": len(part.data),
                }
        return summary

    async def api_upload(self, request: Request) -> Response:
        """``POST /v1/files/upload``: one multipart ``file``, bound to the ``user`` field
        (``DEFAULT-USER`` without one, shared by everyone, as Dify)."""
        parts = await self._parts(request)
        if isinstance(parts, Response):
            self._enter(request, None)
            return parts
        app = self._enter(request, self._summary(parts))
        if isinstance(app, Response):
            return app
        files = [p for p in parts if p.name == "file"]
        if not files:
            return error(400, "no_file_uploaded", "Please upload your file.")
        if len(files) > 1:
            return error(400, "too_many_files", "Only one file is allowed.")
        upload = files[0]
        if not upload.filename:
            return error(400, "filename_not_exists_error", "The specified filename does not exist.")
        if "/" in upload.filename or "\\" in upload.filename:
            return invalid("Filename must not contain '/' or '\\'.")
        if upload.content_type is None:
            return error(415, "unsupported_file_type", "File type not allowed.")
        extension = upload.filename.rsplit(".", 1)[1].lower() if "." in upload.filename else None
        limit_mb = {
            "image": app.image_file_size_limit,
            "video": app.video_file_size_limit,
            "audio": app.audio_file_size_limit,
            "document": app.file_size_limit,
        }[file_category(extension)]
        if len(upload.data) > limit_mb * _MB:
            return error(413, "file_too_large", "")
        user = next((p.text for p in parts if p.name == "user" and p.filename is None), "")
        stored = UploadedFile(
            id=str(uuid.uuid4()),
            app=app.name,
            user=user or "DEFAULT-USER",
            name=upload.filename,
            extension=extension,
            mime_type=upload.content_type,
            data=upload.data,
            created_at=int(time.time()),
        )
        self.store.files[stored.id] = stored
        base = str(request.base_url).rstrip("/") + "/v1"
        return json_response(stored.as_dict(base), 201)

    async def api_preview(self, request: Request) -> Response:
        """``GET /v1/files/{id}/preview``: app-wide (``user`` has no effect), as Dify."""
        app = self._enter(request, None)
        if isinstance(app, Response):
            return app
        file_id = str(request.path_params["file_id"])
        found = self.store.files.get(file_id)
        if found is None:
            return error(404, "file_not_found", "The requested file was not found.")
        if found.app != app.name:
            return error(403, "file_access_denied", "Access to the requested file is denied.")
        headers = {}
        if request.query_params.get("as_attachment", "").lower() == "true":
            headers["Content-Disposition"] = f'attachment; filename="{found.name}"'
        return Response(found.data, 200, headers, media_type=found.mime_type)

    async def api_audio_to_text(self, request: Request) -> Response:
        """``POST /v1/audio-to-text``: a deterministic transcript (``media.transcript_of``)."""
        parts = await self._parts(request)
        if isinstance(parts, Response):
            self._enter(request, None)
            return parts
        app = self._enter(request, self._summary(parts))
        if isinstance(app, Response):
            return app
        files = [p for p in parts if p.name == "file"]
        if not files:
            return error(400, "no_audio_uploaded", "Please upload your audio.")
        if not app.speech_to_text:
            return error(400, "speech_to_text_disabled", "Speech to text is disabled.")
        audio = files[0]
        if len(audio.data) > AUDIO_LIMIT_BYTES:
            return error(413, "audio_too_large", "Audio size larger than 30 mb")
        name = (audio.filename or "").lower()
        extension = name.rsplit(".", 1)[1] if "." in name else ""
        if extension not in AUDIO_EXTENSIONS and audio.content_type not in AUDIO_MIME_TYPES:
            return error(415, "unsupported_audio_type", "Audio type not allowed.")
        return json_response({"text": transcript_of(audio.data)})

    async def api_text_to_audio(self, request: Request) -> Response:
        """``POST /v1/text-to-audio``: ``message_id`` wins over ``text``; fake MP3 bytes."""
        body = await self._json_body(request) or {}
        app = self._enter(request, body)
        if isinstance(app, Response):
            return app
        user = _user_of(request, body)
        if not user:
            return invalid(USER_REQUIRED)
        if not app.text_to_speech:
            return invalid("TTS is not enabled")
        message_id, text = body.get("message_id"), body.get("text")
        if isinstance(message_id, str) and message_id:
            message = self.store.message(app, message_id, user)
            if message is None:
                return not_found(_MESSAGE_GONE)
            text = message.answer
        if not isinstance(text, str) or not text:
            return invalid("text is required")
        return Response(speech_of(text), 200, media_type="audio/mpeg")

    # ----------------------------------------------------------------------- workflow runs

    async def api_run_detail(self, request: Request) -> Response:
        """``GET /v1/workflows/run/{id}``: app-wide, any user of the app (Dify)."""
        app = self._enter(request, None, _workflow_apps)
        if isinstance(app, Response):
            return app
        run = self.store.run(app, str(request.path_params["workflow_run_id"]))
        if run is None:
            return not_found("Workflow run not found.")
        return json_response(run.detail())

    async def api_workflow_logs(self, request: Request) -> Response:
        """``GET /v1/workflows/logs``: app-wide run summaries, newest first."""
        app = self._enter(request, None, _workflow_apps)
        if isinstance(app, Response):
            return app
        params = request.query_params
        try:
            page = query_int(request, "page", 1, 1, 99_999)
            limit = query_int(request, "limit", 20, 1, 100)
        except ValueError as exc:
            return invalid(str(exc))
        status = params.get("status")
        if status and status not in ("succeeded", "failed", "stopped"):
            return invalid("status must be succeeded, failed or stopped")
        runs = sorted(
            (r for r in self.store.runs.values() if r.app == app.name),
            key=lambda r: r.order,
            reverse=True,
        )
        if status:
            runs = [r for r in runs if r.status == status]
        if session := params.get("created_by_end_user_session_id"):
            runs = [r for r in runs if r.user == session]
        if keyword := params.get("keyword"):
            runs = [r for r in runs if keyword in orjson.dumps(r.inputs).decode()]
        chunk = runs[(page - 1) * limit : page * limit]
        return json_response(
            {
                "page": page,
                "limit": limit,
                "total": len(runs),
                "has_more": len(runs) > page * limit,
                "data": [_log_item(app, run) for run in chunk],
            }
        )

    # ----------------------------------------------------------------------- forms

    def _form(self, app: AppSpec, request: Request) -> Form | Response:
        form = self.store.forms.get(str(request.path_params["form_token"]))
        if form is None or form.app != app.name:
            return not_found(_FORM_GONE)
        if form.submitted_by is not None:
            return error(
                412,
                "human_input_form_submitted",
                "This form has already been submitted by another user, "
                f"form_id={form.spec.form_id}",
            )
        if form.expired:
            return error(
                412,
                "human_input_form_expired",
                f"This form has expired, form_id={form.spec.form_id}",
            )
        if form.outcome.done():
            return not_found(_FORM_GONE)  # the run was stopped while it waited
        return form

    async def api_form_get(self, request: Request) -> Response:
        """``GET /v1/form/human_input/{token}``: the form's definition while it is open."""
        app = self._enter(request, None, _workflow_apps)
        if isinstance(app, Response):
            return app
        form = self._form(app, request)
        if isinstance(form, Response):
            return form
        definition = form.spec.definition(form.token, form.expiration_time)
        return json_response(
            {
                "form_content": definition["form_content"],
                "inputs": definition["inputs"],
                "resolved_default_values": definition["resolved_default_values"],
                "user_actions": definition["actions"],
                "expiration_time": form.expiration_time,
            }
        )

    async def api_form_submit(self, request: Request) -> Response:
        """``POST /v1/form/human_input/{token}`` with ``{inputs, action, user}``: not
        user-checked and one-shot: the first valid submit wins (NOTES §8)."""
        body = await self._json_body(request)
        app = self._enter(request, body, _workflow_apps)
        if isinstance(app, Response):
            return app
        if body is None:
            return bad_request("Invalid JSON payload received or JSON payload is empty.")
        form = self._form(app, request)
        if isinstance(form, Response):
            return form
        inputs, action = body.get("inputs", {}), body.get("action")
        if not isinstance(inputs, dict):
            return error(400, "invalid_form_data", "inputs must be an object")
        if action not in form.spec.action_ids:
            return error(400, "invalid_form_data", f"Invalid action: {action}")
        missing = [name for name in form.spec.required_inputs if name not in inputs]
        if missing:
            return error(400, "invalid_form_data", f"Missing required inputs: {', '.join(missing)}")
        user = body.get("user")
        form.submitted_by = user if isinstance(user, str) else ""
        form.outcome.set_result(Filled(str(action), inputs))
        # From now on ``/events`` gives the resumed part, even before the run wakes up.
        form.run.status, form.run.replay_from = "running", len(form.run.frames)
        return json_response({})


def _log_item(app: AppSpec, run: Any) -> dict[str, Any]:
    """One ``/workflows/logs`` item (WorkflowLogItem)."""
    return {
        "id": str(uuid.uuid5(uuid.UUID(run.id), "log")),
        "workflow_run": {
            "id": run.id,
            "version": "2026-01-01 00:00:00.000000",
            "status": run.status,
            "error": run.error,
            "elapsed_time": run.elapsed_time,
            "total_tokens": run.total_tokens,
            "total_steps": run.total_steps,
            "created_at": run.created_at,
            "finished_at": run.finished_at,
            "exceptions_count": 0,
            "triggered_from": "app-run",
        },
        "created_from": "service-api",
        "created_by_role": "end_user",
        "created_by_account": None,
        "created_by_end_user": {
            "id": str(uuid.uuid5(uuid.UUID(app.app_id), run.user)),
            "type": "service-api",
            "is_anonymous": False,
            "session_id": run.user,
        },
        "created_at": run.created_at,
        "details": None,
    }
