"""Who owns what tokenwire created, where Dify does not scope it to a user. No I/O.

Dify scopes conversations and messages to their end user, but not run details, workflow stops,
human-input forms or file previews (NOTES.md §8): any user of an app can name any id. So the
worker records the owner of every run, task, form and file it creates for a user, and checks
it before it lets a user name one (``runs.get``, a file in a later ``chat``/``run``, a stop, a
form answer). Another user's id is ``not_found``, exactly as an id that never existed or has
expired: the three look the same, so ids cannot be probed.

This module holds the rules; ``worker/ownership.py`` keeps the records in NATS KV
(``tw_owners``, key :func:`shared.subjects.owner_key`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal, get_args

import orjson

from shared.exceptions import NotFound

__all__ = [
    "KINDS",
    "Kind",
    "check_owner",
    "decode_owner",
    "encode_owner",
    "file_ids",
    "recordable",
]

Kind = Literal["run", "task", "form", "file"]
KINDS: Final[tuple[Kind, ...]] = get_args(Kind)
# Dify's ids are UUIDs; anything else a client names cannot have been recorded (and must not
# reach a KV key: NATS refuses spaces, wildcards and dots in a token).
_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def recordable(id: str) -> bool:
    """Whether ``id`` can be a key of the owners bucket."""
    return bool(_ID.match(id))


def encode_owner(user: str) -> bytes:
    return orjson.dumps({"user": user})


def decode_owner(value: bytes) -> str | None:
    """The owner in a stored record; None for anything that is not one."""
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    user = obj.get("user") if isinstance(obj, dict) else None
    return user if isinstance(user, str) and user else None


def check_owner(kind: Kind, id: str, owner: str | None, user: str) -> None:
    """Raise :class:`NotFound` unless ``user`` owns ``id`` (None: nobody recorded it)."""
    if owner is None or owner != user:
        raise NotFound(f"no {kind} {id!r} for this user")


def _local_file(item: object) -> str | None:
    if not isinstance(item, Mapping):
        return None
    file_id = item.get("upload_file_id")
    if item.get("transfer_method") == "local_file" and isinstance(file_id, str):
        return file_id
    return None


def file_ids(files: Iterable[Any], inputs: Mapping[str, Any]) -> list[str]:
    """The uploaded-file ids a send names: in ``files`` and in file variables of ``inputs``
    (a file object, or a list of them), each once, in order."""
    found: list[str] = []
    candidates: list[object] = list(files)
    for value in inputs.values():
        candidates.extend(value if isinstance(value, list) else [value])
    for item in candidates:
        file_id = _local_file(item)
        if file_id is not None and file_id not in found:
            found.append(file_id)
    return found
