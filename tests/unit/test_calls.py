"""The call catalogue: every method maps to its Dify endpoint, as this user, with checked params."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.calls import METHODS, build_request, call_error
from shared.exceptions import (
    BadParams,
    DifyRejected,
    DifyUnavailable,
    ErrorCode,
    FeatureDisabled,
    NotFound,
    UnknownMethod,
)

CONTRACT_METHODS = {
    "apps.list",
    "app.info",
    "app.parameters",
    "app.meta",
    "app.site",
    "conversations.list",
    "conversations.rename",
    "conversations.delete",
    "conversations.variables",
    "conversations.set_variable",
    "messages.list",
    "messages.feedback",
    "messages.suggested",
    "text.to_audio",
    "runs.get",
}


def test_the_catalogue_is_the_contracts_list() -> None:
    assert set(METHODS) == CONTRACT_METHODS


@pytest.mark.parametrize(
    ("name", "params", "http", "path", "query", "body"),
    [
        ("app.parameters", {}, "GET", "/parameters", {}, None),
        (
            "conversations.list",
            {"limit": 5, "sort_by": "-created_at"},
            "GET",
            "/conversations",
            {"limit": 5, "sort_by": "-created_at", "user": "alice"},
            None,
        ),
        (
            "conversations.rename",
            {"conversation_id": "c-1", "name": "Orders"},
            "POST",
            "/conversations/c-1/name",
            {},
            {"name": "Orders", "user": "alice"},
        ),
        (
            "conversations.delete",
            {"conversation_id": "c-1"},
            "DELETE",
            "/conversations/c-1",
            {},
            {"user": "alice"},
        ),
        (
            "conversations.set_variable",
            {"conversation_id": "c-1", "variable_id": "v-2", "value": {"x": [1]}},
            "PUT",
            "/conversations/c-1/variables/v-2",
            {},
            {"value": {"x": [1]}, "user": "alice"},
        ),
        (
            "messages.list",
            {"conversation_id": "c-1", "first_id": "m-9", "limit": 20},
            "GET",
            "/messages",
            {"conversation_id": "c-1", "first_id": "m-9", "limit": 20, "user": "alice"},
            None,
        ),
        (
            "messages.feedback",
            {"message_id": "m-1", "rating": None},
            "POST",
            "/messages/m-1/feedbacks",
            {},
            {"rating": None, "user": "alice"},
        ),
        (
            "messages.suggested",
            {"message_id": "m-1"},
            "GET",
            "/messages/m-1/suggested",
            {"user": "alice"},
            None,
        ),
        ("runs.get", {"workflow_run_id": "r-1"}, "GET", "/workflows/run/r-1", {}, None),
    ],
)
def test_each_method_becomes_its_dify_request_as_this_user(
    name: str,
    params: dict[str, object],
    http: str,
    path: str,
    query: dict[str, object],
    body: dict[str, object] | None,
) -> None:
    request = build_request(name, params, "alice")
    assert (request.http, request.path, request.query, request.body) == (http, path, query, body)
    assert request.app == "default"


def test_app_scoping_and_the_user_is_never_the_clients() -> None:
    assert build_request("app.info", {"app": "sales"}, "alice").app == "sales"
    with pytest.raises(BadParams, match="user"):
        build_request("conversations.list", {"user": "mallory"}, "alice")


@pytest.mark.parametrize(
    ("name", "params", "why"),
    [
        ("conversations.list", {"limit": 0}, "limit"),
        ("conversations.list", {"limit": True}, "limit"),
        ("conversations.list", {"sort_by": "name"}, "sort_by"),
        ("conversations.list", {"cursor": "x"}, "unknown param"),
        ("conversations.rename", {"conversation_id": "c-1"}, "name or auto_generate"),
        ("conversations.delete", {}, "conversation_id: is required"),
        ("conversations.delete", {"conversation_id": "../../apps"}, "conversation_id"),
        ("messages.feedback", {"message_id": "m-1", "rating": "meh"}, "rating"),
        ("messages.list", {}, "conversation_id: is required"),
        ("text.to_audio", {}, "message_id or text"),
        ("app.info", {"app": 3}, "app"),
    ],
)
def test_bad_params_are_refused_before_dify(name: str, params: dict[str, object], why: str) -> None:
    with pytest.raises(BadParams, match=why) as caught:
        build_request(name, params, "alice")
    assert caught.value.code is ErrorCode.BAD_PARAMS


def test_an_unknown_method() -> None:
    with pytest.raises(UnknownMethod) as caught:
        build_request("admin.delete_everything", {}, "alice")
    assert caught.value.code is ErrorCode.UNKNOWN_METHOD


@given(st.text(max_size=200))
def test_no_path_param_can_leave_its_segment(value: str) -> None:
    try:
        request = build_request("conversations.delete", {"conversation_id": value}, "alice")
    except BadParams:
        return
    rest = request.path.removeprefix("/conversations/")
    assert rest == value and "/" not in rest and "." not in rest and "?" not in rest


def test_dify_errors_become_the_protocols_codes() -> None:
    suggested = METHODS["messages.suggested"]
    listing = METHODS["conversations.list"]
    assert isinstance(call_error(listing, 404, "not_found", "Conversation Not Exists."), NotFound)
    off = call_error(suggested, 400, "bad_request", "Suggested Questions Is Disabled.")
    assert isinstance(off, FeatureDisabled) and off.code is ErrorCode.FEATURE_DISABLED
    busy = call_error(listing, 429, "too_many_requests", "Too many", retry_after_s=3)
    assert isinstance(busy, DifyUnavailable) and busy.retryable and busy.retry_after_ms == 3000
    down = call_error(listing, 502, None, "Bad Gateway")
    assert down.retryable and down.retry_after_ms is not None
    bad = call_error(listing, 400, "invalid_param", "limit out of range")
    assert isinstance(bad, BadParams)
    refused = call_error(listing, 401, "unauthorized", "bad key")
    assert isinstance(refused, DifyRejected) and refused.code is ErrorCode.DIFY_UNAUTHORIZED
    assert not refused.retryable
