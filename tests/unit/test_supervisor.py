"""The supervisor of ``--workers N`` / ``--processes N``: its restart policy (no I/O), its
shell around real (tiny) child processes, and how the worker pod words its readiness."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import pytest

from tokenwire.supervisor import (
    GiveUp,
    Restart,
    RestartPolicy,
    Supervisor,
    describe_exit,
    listen,
)
from worker.pod import combine_readiness

READY = {"ready": True, "nats": "connected", "jobs": "subscribed", "dify": "ok"}


def test_exit_causes_in_words() -> None:
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(-15) == "killed by SIGTERM"


def test_a_child_that_dies_is_restarted_later_each_time_then_given_up_on() -> None:
    policy = RestartPolicy(max_exits=4, window_s=60, base_delay_s=0.5, max_delay_s=10)
    decisions = [policy.on_exit("gateway process 0", 1, now=t) for t in (0, 1, 2)]
    assert decisions == [Restart(0.0), Restart(0.5), Restart(1.0)]
    final = policy.on_exit("gateway process 0", -9, now=3)
    assert isinstance(final, GiveUp) and final.exit_code == 1
    assert "gateway process 0 keeps dying: 4 exits within 60 s" in final.reason
    assert "killed by SIGKILL" in final.reason


def test_deaths_far_apart_never_add_up_and_slots_count_apart() -> None:
    policy = RestartPolicy(max_exits=2, window_s=10)
    assert policy.on_exit("w", 1, now=0) == Restart(0.0)
    assert policy.on_exit("w", 1, now=0, slot=1) == Restart(0.0)  # another child
    assert policy.on_exit("w", 1, now=11) == Restart(0.0)  # the first left the window
    assert isinstance(policy.on_exit("w", 1, now=12), GiveUp)


def test_a_child_that_refuses_its_configuration_stops_everything_at_once() -> None:
    decision = RestartPolicy().on_exit("worker process 1", 2, now=0)
    assert decision == GiveUp("worker process 1 refused to start (exit code 2)", 2)


def _supervisor(code: str, count: int = 2, **kwargs: object) -> Supervisor:
    return Supervisor(
        "test",
        count,
        lambda slot: [sys.executable, "-c", code],
        env=dict(os.environ),
        stop_grace_s=5,
        poll_s=0.02,
        **kwargs,  # type: ignore[arg-type]
    )


SLEEPER = "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\ntime.sleep(60)"


async def _until(check: object, timeout: float = 10.0) -> None:
    async def wait() -> None:
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.02)

    await asyncio.wait_for(wait(), timeout)


async def test_a_killed_child_is_restarted_and_sigterm_stops_all_with_0(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "tokenwire.supervisor")
    sup = _supervisor(SLEEPER)
    run = asyncio.create_task(sup.run())
    await _until(lambda: all(sup.running(s) for s in (0, 1)))
    first = sup.children[0].popen
    assert first is not None
    first.kill()
    await _until(lambda: sup.children[0].popen not in (None, first) and sup.running(0))
    assert f"test process 0 (pid {first.pid}) died: killed by SIGKILL; restarting" in caplog.text
    pids = [c.popen.pid for c in sup.children if c.popen is not None]
    sup.request_stop(signal.SIGTERM)
    assert await asyncio.wait_for(run, 10) == 0
    assert all(not _alive(pid) for pid in pids)


async def test_a_child_that_keeps_dying_stops_the_whole_with_a_clear_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sup = _supervisor(
        "import sys; sys.exit(1)", count=1, policy=RestartPolicy(max_exits=3, base_delay_s=0.01)
    )
    assert await asyncio.wait_for(sup.run(), 10) == 1
    assert "test process 0 (pid " in caplog.text
    assert "keeps dying: 3 exits within 60 s, the last with exit code 1; stopping every" in (
        caplog.text
    )


async def test_a_child_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)"
    sup = Supervisor(
        "test",
        1,
        lambda slot: [sys.executable, "-c", stubborn],
        env=dict(os.environ),
        stop_grace_s=0.5,
        poll_s=0.02,
    )
    run = asyncio.create_task(sup.run())
    await _until(lambda: sup.running(0))
    await asyncio.sleep(0.3)  # let the child install its handler
    sup.request_stop(signal.SIGTERM)
    assert await asyncio.wait_for(run, 10) == 1  # killed: not the clean end it was asked for


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_listen_refuses_a_port_in_use_once() -> None:
    first = listen("127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            listen("127.0.0.1", first.getsockname()[1])
    finally:
        first.close()


def test_the_pod_is_ready_only_when_every_process_is() -> None:
    ready, body = combine_readiness([READY, READY])
    assert ready and body["dify"] == "ok" and len(body["processes"]) == 2
    waiting = {**READY, "ready": False, "dify": "unreachable: refused"}
    ready, body = combine_readiness([READY, waiting])
    assert not ready
    assert body["dify"] == "unreachable: refused" and body["nats"] == "connected"
    assert body["processes"][1] == {"process": 1, **waiting}


def test_a_process_that_does_not_answer_keeps_the_pod_unready() -> None:
    ready, body = combine_readiness([READY, None])
    assert not ready
    assert body["processes"][1] == {"process": 1, "ready": False, "state": "not answering"}
    ready, body = combine_readiness([None, None])
    assert not ready and body["jobs"] == "no answer"


def test_process_counts_below_one_are_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from tokenwire.cli import app

    runner = CliRunner()
    flag = runner.invoke(app, ["gateway", "--workers", "0"])
    assert flag.exit_code == 2 and "--workers" in flag.output
    monkeypatch.setenv("TOKENWIRE_WORKER_PROCESSES", "0")
    monkeypatch.setenv("DIFY_API_KEY", "app-test")
    setting = runner.invoke(app, ["worker"])
    assert setting.exit_code == 2
    assert "refusing to start: bad configuration: worker_processes" in setting.output
