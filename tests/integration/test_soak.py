"""The soak, sized for the suite: 2 minutes of idle connections and a chat every 100 ms.

One gateway, one worker, the simulator and NATS as processes. Every answer must equal the
simulator's with each ``seq`` once; after the warm-up nothing may grow at constant load: the
gateway's and the worker's RSS (second half against first half: within 5 % plus a small
absolute slack for allocator noise), their asyncio task counts and the NATS subscriptions.
The 10-minute, 10,000-connection run is ``python -m bench.soak`` (docs/benchmarks.md).
"""

from __future__ import annotations

import pytest

from bench.soak import Target, run_soak
from tests.integration.stack import Stack
from tokenwire.natsserver import NatsServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IDLE = 500
# One user chats 10 times a second on one connection: lift its rate and in-flight caps (a
# slow moment on a crowded machine puts more than 32 answers in flight at once).
STACK_ENV = {
    "TOKENWIRE_RATE_PER_USER": "100/s",
    "TOKENWIRE_MAX_INFLIGHT_PER_CONNECTION": "512",
    "TOKENWIRE_MAX_INFLIGHT_PER_USER": "512",
    "TOKENWIRE_DRAIN_DELAY_S": "0",
}
# A leak of one 2 KiB object per chat is ~2.4 MiB over the run; allocator noise is well under.
RSS_SLACK_KIB = 2048
# Medians of counts; a chat in flight holds a few worker tasks, and 10 chats/s put 0-10 in
# flight at the instant of a sample. A leak of one task per 50 chats adds 20 over the run.
COUNT_SLACK = 16


@pytest.mark.timeout(240)
async def test_two_minutes_of_idle_connections_and_steady_chats_grow_nothing(
    stack: Stack, nats: NatsServer
) -> None:
    worker = stack.worker()
    gateway = stack.gateway()
    assert worker.popen is not None and gateway.popen is not None and worker.health_url
    target = Target(
        gateway_pid=gateway.popen.pid,
        gateway_metrics=f"http://127.0.0.1:{gateway.port}/metrics",  # type: ignore[attr-defined]
        worker_pid=worker.popen.pid,
        worker_metrics=worker.health_url.replace("/healthz", "/metrics"),
        nats_monitor=nats.monitor_url,
    )
    result = await run_soak(
        stack.ws_url(),
        target,
        idle=IDLE,
        duration_s=110,
        chat_every_s=0.1,
        sample_s=5,
        warmup_s=30,
        # More pongs than websockets' receive queue holds (16) within the run: a client side
        # that stopped reading them would lose its connections here, not only in the bench.
        idle_ping_s=4,
    )
    summary = result.summary()
    for name, growth in summary["growth"].items():
        print(
            f"soak {name}: {growth['first']:.0f} -> {growth['second']:.0f} ({growth['ratio']:+.1%})"
        )
    print(f"soak: {result.chats} chats, {IDLE} idle connections, {len(result.samples)} samples")
    for sample in result.samples:
        print(f"  {sample}")
    assert result.chats >= 500, "the chat load did not run"
    assert result.wrong == [] and result.gaps == []
    assert result.idle_lost == 0, "idle connections were closed"
    for name in ("gateway_rss_kib", "worker_rss_kib"):
        growth = result.growth(name)
        assert growth.within(0.05, RSS_SLACK_KIB), f"{name} grew: {growth}"
    for name in ("gateway_tasks", "worker_tasks", "nats_subscriptions"):
        growth = result.growth(name)
        assert growth.within(0.05, COUNT_SLACK), f"{name} grew: {growth}"
