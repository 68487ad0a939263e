"""The close-code policy of shared/exceptions.py, and the table the browser SDK imports.

web/sdk/close-codes.js is generated (``python -m shared.exceptions``) and committed; these
tests regenerate it and compare, so a close code or a policy cannot change on one side only.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared.exceptions import (
    CLOSE_CODES_JS,
    DEFAULT_CLOSE_POLICY,
    CloseCode,
    ClosePolicy,
    Forbidden,
    FrameTooLarge,
    IdleTimeout,
    InternalError,
    RateLimited,
    TokenExpired,
    TokenwireError,
    TooManyConnections,
    Unauthorized,
    UnknownRequest,
    close_code_table,
    close_codes_module,
    close_policy,
)
from shared.frames import encode, error_frame

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_sdk_table_is_the_catalogue() -> None:
    committed = (ROOT / CLOSE_CODES_JS).read_text(encoding="utf-8")
    assert committed == close_codes_module(), "run `python -m shared.exceptions` and commit"


def test_the_module_holds_exactly_the_table_as_json() -> None:
    match = re.search(r"Object\.freeze\((\{.*\})\);\s*$", close_codes_module(), re.S)
    assert match is not None
    assert json.loads(match.group(1)) == close_code_table()


def test_the_generator_writes_the_module(tmp_path: Path) -> None:
    target = tmp_path / "close-codes.js"
    subprocess.run(
        [sys.executable, "-m", "shared.exceptions", str(target)], cwd=ROOT, check=True, timeout=60
    )
    assert target.read_text(encoding="utf-8") == close_codes_module()


def test_every_code_has_a_policy_and_the_table_names_them_all() -> None:
    table = close_code_table()
    assert table["default"] == DEFAULT_CLOSE_POLICY.value
    assert set(table["codes"]) == {str(int(code)) for code in CloseCode}
    for code in CloseCode:
        assert table["codes"][str(int(code))] == {"name": code.name, "policy": code.policy.value}
    # The standard codes the gateway, uvicorn and the network produce are all named.
    assert {1000, 1001, 1006, 1008, 1009, 1011, 1013} <= {int(code) for code in CloseCode}


@pytest.mark.parametrize(
    ("code", "policy"),
    [
        (4001, ClosePolicy.GIVE_UP),
        (4003, ClosePolicy.GIVE_UP),
        (1008, ClosePolicy.GIVE_UP),
        (4002, ClosePolicy.REFRESH_TOKEN),
        (4103, ClosePolicy.WAIT_FOR_USER),
        (1000, ClosePolicy.WAIT_FOR_USER),
        (1006, ClosePolicy.RECONNECT),
        (1009, ClosePolicy.RECONNECT),
        (4100, ClosePolicy.RECONNECT),
        (4004, ClosePolicy.RECONNECT),
        (1013, ClosePolicy.RECONNECT),
    ],
)
def test_what_a_client_does_after_each_close(code: int, policy: ClosePolicy) -> None:
    assert close_policy(code) is policy


@pytest.mark.parametrize("code", [None, 1005, 4199, 4050, 3000])
def test_a_code_outside_the_catalogue_reconnects(code: int | None) -> None:
    assert close_policy(code) is ClosePolicy.RECONNECT


@pytest.mark.parametrize(
    ("exc", "close"),
    [
        (Unauthorized("x"), CloseCode.UNAUTHORIZED),
        (TokenExpired("x"), CloseCode.TOKEN_EXPIRED),
        (Forbidden("x"), CloseCode.FORBIDDEN),
        (IdleTimeout("x"), CloseCode.IDLE_TIMEOUT),
        (TooManyConnections("x", retry_after_s=3), CloseCode.TOO_MANY_CONNECTIONS),
        (FrameTooLarge("x"), None),
        (UnknownRequest("x"), None),
        (RateLimited("x", retry_after_s=1), None),
        (InternalError("x"), None),
    ],
)
def test_each_error_knows_its_close_code(exc: TokenwireError, close: CloseCode | None) -> None:
    assert exc.close_code is close


def test_retry_hints_become_whole_milliseconds_on_the_wire() -> None:
    limited = RateLimited("slow down", retry_after_s=0.0101, request_id="r")
    assert limited.retry_after_ms == 11
    assert RateLimited("x", retry_after_s=0.0).retry_after_ms == 1
    assert RateLimited("x", retry_after_s=math.inf).retry_after_ms is None
    assert Unauthorized("x").retry_after_ms is None
    wire = json.loads(encode(error_frame(limited, id="r", seq=1)))
    assert wire["retry_after_ms"] == 11 and wire["id"] == "r" and wire["seq"] == 1
    assert "retry_after_ms" not in json.loads(encode(error_frame(Unauthorized("x"))))
    conn_level = json.loads(encode(error_frame(TooManyConnections("x", retry_after_s=2.5))))
    assert conn_level["retry_after_ms"] == 2500 and "id" not in conn_level


def test_an_error_crosses_nats_with_its_code_and_hint() -> None:
    from shared.exceptions import BusFull, ErrorCode, error_from_wire, error_to_wire

    sent = BusFull("cannot store the request: storage is full")
    back = error_from_wire(error_to_wire(sent))
    assert (back.code, back.message, back.retryable) == (sent.code, sent.message, True)
    assert back.retry_after_ms == 5000
    odd = error_from_wire({"code": "no_such_code", "message": "?"})
    assert odd.code is ErrorCode.INTERNAL_ERROR and odd.retry_after_ms is None
