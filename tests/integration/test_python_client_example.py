"""docs/python-client.md's example (docs/examples/python_client.py) run as a user would run it,
against a JWT gateway on the spine: it prints exactly the simulator's answer, and Dify saw the
token's user. The doc must show the file as it is."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.integration.stack import Stack
from tokenwire.simulator import expected_final_answer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "python_client.py"
SECRET = "example-secret-" + uuid.uuid4().hex


def test_the_doc_shows_the_example_as_it_is() -> None:
    doc = (ROOT / "docs" / "python-client.md").read_text()
    assert EXAMPLE.read_text().strip() in doc


def test_the_example_answers_through_a_jwt_gateway(spine: Stack) -> None:
    gateway = spine.gateway(
        "gateway-example",
        TOKENWIRE_AUTH="jwt",
        TOKENWIRE_ALLOW_INSECURE="0",
        TOKENWIRE_JWT_SECRET=SECRET,
    )
    user, question = f"bot-{uuid.uuid4().hex[:8]}", "What does the example print?"
    env = os.environ | {
        "TOKENWIRE_URL": spine.ws_url(gateway.port),  # type: ignore[attr-defined]
        "TOKENWIRE_JWT_SECRET": SECRET,
    }
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), user, question],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected_final_answer(question)
    sent = httpx.get(f"{spine.sim_url.removesuffix('/v1')}/_sim/requests").json()
    assert any(r["query"] == question and r["user"] == user for r in sent)
