"""The Dockerfile and .dockerignore read as data, for the tests that check and replay them.

tests/deploy/ checks what the image promises (stages, user, environment, what it copies);
tests/install/ replays its build without Docker (no engine runs on these machines) and starts
the result as the Kubernetes manifests do.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Instruction", "dockerfile", "env_of", "ignore_patterns", "ignored", "stages"]


@dataclass(frozen=True, slots=True)
class Instruction:
    word: str  # FROM, COPY, RUN … in upper case
    rest: str  # its arguments, continuation lines joined


def dockerfile(path: Path) -> list[Instruction]:
    """Every instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append(Instruction(word.upper(), rest.strip()))
    return out


def stages(path: Path) -> list[list[Instruction]]:
    """The instructions of each stage (``ARG`` before the first ``FROM`` is dropped)."""
    out: list[list[Instruction]] = []
    for step in dockerfile(path):
        if step.word == "FROM":
            out.append([])
        if out:
            out[-1].append(step)
    return out


def env_of(stage: list[Instruction]) -> dict[str, str]:
    """The ``ENV`` a stage sets, in order (later wins), values as written (``$PATH`` kept)."""
    env: dict[str, str] = {}
    for step in stage:
        if step.word == "ENV":
            for item in shlex.split(step.rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def ignore_patterns(path: Path) -> list[str]:
    return [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def ignored(name: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``name`` (a file or folder of the context) out."""
    name = name.rstrip("/")
    parts = name.split("/")
    return any(
        fnmatch.fnmatch(name, p.rstrip("/"))
        or name.startswith(p.rstrip("/") + "/")
        # "**/x" matches x at any depth
        or (p.startswith("**/") and any(fnmatch.fnmatch(part, p[3:]) for part in parts))
        for p in patterns
    )
