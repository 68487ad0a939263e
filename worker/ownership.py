"""The owners of runs, tasks, forms and files, kept in NATS KV (``tw_owners``).

The rules are ``shared/ownership.py``'s; this module only reads and writes the records, through
the NATS edge. Whoever creates one of those ids for a user records it at once::

    await owners.record("run", workflow_run_id, job.user)   # a workflow run started
    await owners.record("task", task_id, job.user)          # a task a stop may name
    await owners.record("form", form_id, job.user)          # a human-input form
    await owners.record("file", file["id"], user)           # an upload (worker/uploads.py)

and whoever lets a user name one checks it first: ``await owners.check("run", id, user)``
raises :class:`~shared.exceptions.NotFound` unless ``user`` owns it; ``owner_of`` gives the
owner (None: nobody recorded it, or the record expired).
"""

from __future__ import annotations

import logging

from nats.js.kv import KeyValue

from shared import natsedge
from shared.exceptions import NotFound
from shared.jobs import Job
from shared.ownership import (
    Kind,
    check_owner,
    decode_owner,
    encode_owner,
    file_ids,
    recordable,
)
from shared.subjects import owner_key

__all__ = ["Ownership"]

log = logging.getLogger("tokenwire.worker")


class Ownership:
    """Records and checks owners in the ``tw_owners`` bucket."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def record(self, kind: Kind, id: str, user: str) -> None:
        """``user`` owns ``id`` from now on. The first record wins: an id Dify gave one user
        is never handed to another, whatever a later record says."""
        if not recordable(id):
            log.warning("an id that cannot be recorded", extra={"kind": kind})
            return
        created = await natsedge.kv_create(self.kv, owner_key(kind, id), encode_owner(user))
        if created is None:
            owner = await self.owner_of(kind, id)
            if owner != user:
                log.warning("an id is already recorded for another user", extra={"kind": kind})

    async def owner_of(self, kind: Kind, id: str) -> str | None:
        """The user who owns ``id`` (None: never recorded, or expired)."""
        if not recordable(id):
            return None
        entry = await natsedge.kv_get(self.kv, owner_key(kind, id))
        return decode_owner(entry.value) if entry is not None else None

    async def check(self, kind: Kind, id: str, user: str) -> None:
        """Raise :class:`NotFound` unless ``user`` owns ``id``."""
        check_owner(kind, id, await self.owner_of(kind, id), user)

    async def check_files(self, job: Job) -> NotFound | None:
        """Why ``job`` may not be sent (a file it names is not its user's), or None."""
        for file_id in file_ids(job.files, job.inputs):
            try:
                await self.check("file", file_id, job.user)
            except NotFound as exc:
                return exc
        return None
