"""A worker's /readyz: ready only with NATS, the job consumer and Dify, each named when not."""

from __future__ import annotations

from shared.exceptions import DifyRejected, DifyUnavailable, ErrorCode
from worker.readiness import FAILED_FOR_S, OK_FOR_S, Readiness


class FakeDify:
    def __init__(self) -> None:
        self.error: Exception | None = None
        self.calls = 0

    async def info(self) -> object:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return {"mode": "chat"}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(nats: bool = True) -> tuple[Readiness, FakeDify, Clock]:
    dify, clock = FakeDify(), Clock()
    state = {"nats": nats}
    readiness = Readiness(dify.info, lambda: state["nats"], clock=clock)
    return readiness, dify, clock


async def test_not_ready_until_subscribed_and_dify_is_not_asked_before() -> None:
    readiness, dify, _ = make()
    ready, facts = await readiness.report()
    assert not ready and facts["jobs"] == "starting" and dify.calls == 0
    readiness.subscribed = True
    assert await readiness.report() == (
        True,
        {"nats": "connected", "jobs": "subscribed", "dify": "ok"},
    )


async def test_nats_down_is_named() -> None:
    readiness, _, _ = make(nats=False)
    readiness.subscribed = True
    ready, facts = await readiness.report()
    assert not ready and facts["nats"] == "disconnected"


async def test_dify_refusing_or_unreachable_is_named_and_rechecked() -> None:
    readiness, dify, clock = make()
    readiness.subscribed = True
    dify.error = DifyRejected("Dify 401 unauthorized: bad key", code=ErrorCode.DIFY_UNAUTHORIZED)
    ready, facts = await readiness.report()
    assert not ready and facts["dify"] == "rejected: Dify 401 unauthorized: bad key"

    dify.error = DifyUnavailable("cannot reach Dify (ConnectError)")
    assert (await readiness.report())[1]["dify"].startswith("rejected")  # remembered briefly
    clock.now += FAILED_FOR_S
    assert (await readiness.report())[1]["dify"] == "unreachable: cannot reach Dify (ConnectError)"

    dify.error = None
    clock.now += FAILED_FOR_S
    assert (await readiness.report())[0]
    calls = dify.calls
    clock.now += OK_FOR_S / 2
    assert (await readiness.report())[0] and dify.calls == calls  # a good answer stands longer
    clock.now += OK_FOR_S
    await readiness.report()
    assert dify.calls == calls + 1
