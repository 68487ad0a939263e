"""The NATS permissions of each tokenwire process, as nats-server configuration.

Why: production NATS is shared by gateways (which face the internet) and workers (which hold
Dify's keys). A gateway is given only what it uses (docs/security.md, "NATS permissions"):

* publish: chat jobs, its own frames (the ``accepted`` it stamps), stops, form answers, calls,
  uploads and their chunks, replay requests to the workers; the two limit buckets
  (``tw_connections``, ``tw_rates``); a stop flag in ``tw_requests`` (write only); flow-control
  answers of its replays;
* subscribe: its own frames (``tw.frames.*.<gateway>.>``) and its own inbox only.

So a gateway's credentials cannot read another gateway's frames, the job queue (queries,
inputs), calls' or uploads' answers to other gateways, the request bucket (Dify's ids, form
tokens) or any kept frame except through a worker, one request at a time
(``shared/replay_proxy.py``). Workers get everything (they hold the Dify keys already).

``python -m tokenwire.natsperms gateway-0 gateway-1`` prints an ``authorization`` block for
nats-server (JSON is valid nats-server configuration) with a user per gateway and one for the
workers, passwords to be filled in; deploy/k8s/nats-values.yaml holds the same for the chart.
"""

from __future__ import annotations

import sys
from typing import Any

import orjson

from shared.subjects import (
    CALLS_SUBJECT,
    CONNECTIONS_BUCKET,
    INPUT_SUBJECT,
    JOB_CHAT,
    RATES_BUCKET,
    REPLAY_SUBJECT,
    REQUESTS_BUCKET,
    UPLOADS_STREAM,
    UPLOADS_SUBJECT,
    gateway_frames,
    inbox_prefix,
    stop_flag_key,
    stop_subject,
    upload_chunks,
)

__all__ = ["authorization", "gateway_permissions", "worker_permissions"]


def gateway_permissions(gateway: str) -> dict[str, Any]:
    """What gateway ``gateway`` (its ``TOKENWIRE_GATEWAY_ID``) may publish and subscribe to."""
    limits = (CONNECTIONS_BUCKET, RATES_BUCKET)
    publish = [
        JOB_CHAT,
        gateway_frames(gateway),
        stop_subject("*"),
        INPUT_SUBJECT,
        CALLS_SUBJECT,
        UPLOADS_SUBJECT,
        REPLAY_SUBJECT,
        upload_chunks("*"),
        f"$JS.API.STREAM.PURGE.{UPLOADS_STREAM}",
        f"$KV.{REQUESTS_BUCKET}.{stop_flag_key('*')}",
        f"$JS.API.STREAM.INFO.KV_{REQUESTS_BUCKET}",
        *(f"$KV.{bucket}.>" for bucket in limits),
        *(f"$JS.API.STREAM.INFO.KV_{bucket}" for bucket in limits),
        *(f"$JS.API.DIRECT.GET.KV_{bucket}.>" for bucket in limits),
        *(f"$JS.API.STREAM.MSG.GET.KV_{bucket}" for bucket in limits),
        "$JS.FC.>",
    ]
    subscribe = [gateway_frames(gateway), f"{inbox_prefix(gateway)}.>"]
    return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}


def worker_permissions() -> dict[str, Any]:
    """Workers hold Dify's keys and run every request: everything."""
    return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}


def authorization(gateways: list[str], password: str = "CHANGE-ME") -> dict[str, Any]:
    """An ``authorization`` block: one user per gateway (named as the gateway), one worker."""
    users = [
        {"user": gateway, "password": password, "permissions": gateway_permissions(gateway)}
        for gateway in gateways
    ]
    users.append({"user": "worker", "password": password, "permissions": worker_permissions()})
    return {"authorization": {"users": users}}


def main(argv: list[str]) -> int:
    if not argv or any(arg.startswith("-") for arg in argv):
        print("usage: python -m tokenwire.natsperms GATEWAY_ID [GATEWAY_ID ...]", file=sys.stderr)
        return 2
    sys.stdout.write(orjson.dumps(authorization(argv), option=orjson.OPT_INDENT_2).decode())
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
