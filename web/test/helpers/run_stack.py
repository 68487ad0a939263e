"""A whole tokenwire for node tests that need settings `tokenwire dev` fixes (JWT auth, idle
timeouts): nats-server, the Dify simulator, a worker and one gateway, each its own process,
started by tests/integration/stack.py exactly as the Python integration tests start them.

Usage: python run_stack.py '<gateway env as JSON>'. Prints one JSON line ({"ws_url",
"sim_url", "workdir"}) once the gateway is ready, then runs until stdin closes.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.integration.stack import running_stack


def main() -> None:
    env: dict[str, str] = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    with (
        tempfile.TemporaryDirectory(prefix="tw-web-stack-") as workdir,
        running_stack(Path(workdir)) as stack,
    ):
        stack.gateway(**env)
        ready = {"ws_url": stack.ws_url(), "sim_url": stack.sim_url, "workdir": workdir}
        print(json.dumps(ready), flush=True)
        sys.stdin.read()  # until the test closes our stdin (or dies)


if __name__ == "__main__":
    main()
