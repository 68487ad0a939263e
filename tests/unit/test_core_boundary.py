"""The protocol core stays free of I/O: it imports no network, event-loop or web library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = [
    "sse",
    "mapping",
    "frames",
    "subjects",
    "sequencing",
    "state",
    "exceptions",
    "jobs",
    "topology",
    "breaker",
    "delivery",
    "dify_api",
    "metric_labels",
    "session",
    "calls",
    "coalesce",
    "ownership",
    "uploads",
]
FORBIDDEN = {
    "asyncio",
    "socket",
    "nats",
    "faststream",
    "httpx",
    "starlette",
    "uvicorn",
    "websockets",
    "gateway",
    "worker",
    "tokenwire",
    "trio",
    "anyio",
    "requests",
}
ROOT = Path(__file__).resolve().parents[2] / "shared"


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_io(module: str) -> None:
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN, f"shared/{module}.py imports {imported & FORBIDDEN}"
