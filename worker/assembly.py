"""Putting the worker's runner together: the bus, the apps, the waiting lines, human input.

``worker/app.py`` (the FastStream shell) calls :func:`assemble` once NATS is connected; the
pieces are each app's kind (:class:`~worker.apps.AppKinds`), its cluster-wide slots when it has
``max_active`` (:class:`~worker.apps.AppSlots` and one :class:`~worker.waiting_line.AppLine`
per such app), and the runs waiting for a human (:class:`~worker.human_input.HumanInput`).
"""

from __future__ import annotations

from nats.aio.client import Client
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from shared.apps import app_table
from shared.natsedge import ensure_bucket
from shared.settings import Settings
from shared.topology import app_slots_bucket_config
from worker.apps import AppKinds, AppSlots
from worker.bus import NatsBus
from worker.dify import DifyClient
from worker.human_input import HumanInput
from worker.runner import JobRunner
from worker.waiting_line import AppLine

__all__ = ["assemble"]


async def assemble(
    nc: Client,
    js: JetStreamContext,
    kv: KeyValue,
    dify: DifyClient,
    settings: Settings,
    *,
    worker_id: str,
) -> JobRunner:
    bus = NatsBus(nc, js, kv)
    lines: dict[str, AppLine] = {}
    capped = {name: app for name, app in app_table(settings).items() if app.max_active}
    if capped:
        slots_kv, _ = await ensure_bucket(js, app_slots_bucket_config(settings))
        slots = AppSlots(slots_kv, ttl_s=settings.app_slot_ttl_s, holder=worker_id)
        for name, app in capped.items():
            assert app.max_active is not None
            lines[name] = AppLine(name, app.max_active, slots, poll_s=settings.app_slot_poll_s)
    return JobRunner(
        bus,
        dify,
        settings,
        worker_id=worker_id,
        kinds=AppKinds(dify),
        human=HumanInput(bus, dify),
        events=dify,
        app_lines=lines,
    )
