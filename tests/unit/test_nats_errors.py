"""nats-py's errors become the protocol's bus errors, whichever of its classes NATS raised.

nats-py's key-value errors subclass ``APIError`` without running its ``__init__`` (no
``err_code``, no ``description``); reading those fields raised ``AttributeError`` and turned a
refused slot claim into a crashed handshake. Each case here is what a caller must see instead.
"""

from __future__ import annotations

import pytest
from nats.js import errors as js_errors

from shared.exceptions import BusFull, BusRetryable, BusUnavailable, ErrorCode
from shared.natsedge import map_nats_errors


@pytest.mark.parametrize(
    "raised",
    [
        js_errors.KeyNotFoundError(),
        js_errors.KeyDeletedError(),
        js_errors.KeyWrongLastSequenceError("wrong last sequence: 3"),
        js_errors.NotFoundError(code=404, description="stream not found", err_code=10059),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_every_api_error_is_bus_unavailable(raised: Exception) -> None:
    with pytest.raises(BusUnavailable) as caught, map_nats_errors("claim a slot"):
        raise raised
    assert caught.value.code is ErrorCode.BUS_UNAVAILABLE
    assert "cannot claim a slot: NATS refused (" in str(caught.value)


def test_storage_full_is_bus_full() -> None:
    full = js_errors.APIError(code=503, description="insufficient resources", err_code=10047)
    with pytest.raises(BusFull) as caught, map_nats_errors("store the request"):
        raise full
    assert "insufficient resources" in str(caught.value)


def test_a_timeout_is_retryable() -> None:
    with pytest.raises(BusRetryable), map_nats_errors("look the request up"):
        raise TimeoutError
