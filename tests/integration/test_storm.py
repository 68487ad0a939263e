"""The reconnect storm, sized for the suite: a gateway holding every client SIGKILLed mid-answer.

Three gateways over one NATS, one worker, the simulator; the Python client throughout. The
survivors' admission caps are set low so that refusals (``too_busy``: close 1013 at the
handshake, an id-only ``error`` for a resume) really happen, and the clients must come through
them with jittered waits. Every answer must equal the simulator's, each ``seq`` exactly once,
and the survivors must still serve. The full 1,000-client run is ``python -m bench.storm``
(docs/benchmarks.md); the time to 99 % is printed here, never asserted.
"""

from __future__ import annotations

import httpx
import pytest

from bench.storm import gateway_refusals, run_storm
from tests.integration.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 150
STACK_ENV = {
    "TOKENWIRE_WORKER_CONCURRENCY": "400",
    "TOKENWIRE_RATE_PER_USER": "600/min",
    "TOKENWIRE_DRAIN_DELAY_S": "0",
}
SURVIVOR_CAPS = {
    "TOKENWIRE_MAX_HANDSHAKES": "10",
    "TOKENWIRE_MAX_RESUMES": "10",
    "TOKENWIRE_BUSY_RETRY_S": "0.2",
}


@pytest.mark.timeout(240)
async def test_a_storm_of_reconnects_resumes_every_answer_through_admission_control(
    stack: Stack,
) -> None:
    stack.worker()
    victim = stack.gateway("gateway-victim", TOKENWIRE_MAX_HANDSHAKES=str(CLIENTS))
    survivors = [stack.gateway(f"gateway-{n}", None, **SURVIVOR_CAPS) for n in ("b", "c")]
    ports = [s.port for s in survivors]  # type: ignore[attr-defined]

    result = await run_storm(
        stack.ws_url(victim.port),  # type: ignore[attr-defined]
        [stack.ws_url(port) for port in ports],
        victim.kill,
        clients=CLIENTS,
        # Long enough (10 s) that the last answer to begin is still under way at the kill.
        tokens=200,
        delay_ms=50,
        timeout_s=150,
    )
    refusals = [gateway_refusals(f"http://127.0.0.1:{port}/metrics") for port in ports]
    print(
        f"storm of {CLIENTS}: resumed 50 % in {result.resumed_t50_s:.1f} s, 99 % in "
        f"{result.resumed_t99_s:.1f} s; answers complete 50 % in {result.t50_s:.1f} s, 99 % in "
        f"{result.t99_s:.1f} s, all in {result.t100_s:.1f} s; {result.busy_closes} handshakes and "
        f"{result.busy_resumes} resumes refused as too_busy; survivors counted {refusals}"
    )
    assert result.frames_before_kill_min >= 3, "the kill came before every answer had begun"
    assert result.finished_before_kill == 0, "the kill came after some answers had ended"
    assert result.problems == []
    assert result.completed == CLIENTS
    # Admission control was exercised, and every client came through it.
    assert result.busy_closes > 0, "no handshake was refused: the caps were not reached"
    handshake_refusals = sum(r.get("handshake_limit", 0) for r in refusals)
    resume_refusals = sum(r.get("resume_limit", 0) for r in refusals)
    assert handshake_refusals >= result.busy_closes
    assert resume_refusals == result.busy_resumes
    # The survivors survived the storm: still alive and ready.
    for survivor, port in zip(survivors, ports, strict=True):
        assert survivor.alive
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
