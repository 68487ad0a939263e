"""The NATS permissions of each tokenwire process, as nats-server configuration.

Why: production NATS is shared by gateways (which face the internet) and workers (which hold
Dify's keys). A gateway is given only what it uses (docs/security.md, "NATS permissions"):

* publish: chat jobs, its own frames (the ``accepted`` it stamps), stops, form answers, calls,
  uploads and their chunks, replay requests to the workers; the two limit buckets
  (``tw_connections``, ``tw_rates``); a stop flag in ``tw_requests`` (write only); flow-control
  answers of its replays;
* subscribe: its own frames (the streams' republish, ``tw.live.*.<gateway>.>``) and its own
  inbox only.

So a gateway's credentials cannot read another gateway's frames, the job queue (queries,
inputs), calls' or uploads' answers to other gateways, the request bucket (Dify's ids, form
tokens) or any kept frame except through a worker, one request at a time
(``shared/replay_proxy.py``). Workers get everything (they hold the Dify keys already).

``python -m tokenwire.natsperms gateway-0 gateway-1`` prints an ``authorization`` block for
nats-server (JSON is valid nats-server configuration) with a user per gateway and one for the
workers, passwords to be filled in. With ``--nkeys DIR`` it writes a fresh NKey seed per user
to ``DIR/<user>.nk`` (mode 0600: the Secret the pods mount) and prints the block with their
public keys instead of passwords; deploy/k8s/nats-values-restricted.yaml is such a block for
the chart (regenerate it: its keys are examples).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import nkeys
import orjson

from shared.subjects import (
    CALLS_SUBJECT,
    CONNECTIONS_BUCKET,
    INPUT_SUBJECT,
    JOB_CHAT,
    RATES_BUCKET,
    REPLAY_SUBJECT,
    REQUESTS_BUCKET,
    SUBJECT_TOKEN,
    UPLOADS_STREAM,
    UPLOADS_SUBJECT,
    gateway_frames,
    gateway_stamped_frames,
    inbox_prefix,
    stop_flag_key,
    stop_subject,
    upload_chunks,
)

__all__ = ["WORKER_USER", "authorization", "gateway_permissions", "worker_permissions"]

#: The workers' NATS user.
WORKER_USER = "worker"


def gateway_permissions(gateway: str) -> dict[str, Any]:
    """What gateway ``gateway`` (its ``TOKENWIRE_GATEWAY_ID``) may publish and subscribe to."""
    limits = (CONNECTIONS_BUCKET, RATES_BUCKET)
    publish = [
        JOB_CHAT,
        gateway_stamped_frames(gateway),
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


def authorization(
    gateways: list[str], public_keys: dict[str, str] | None = None, password: str = "CHANGE-ME"
) -> dict[str, Any]:
    """An ``authorization`` block: one user per gateway (named as the gateway) and the workers'.

    With ``public_keys`` (user → NKey public key) users are ``nkey`` entries, else a user name
    and ``password``."""
    perms = {gateway: gateway_permissions(gateway) for gateway in gateways}
    perms[WORKER_USER] = worker_permissions()
    users = []
    for name, permissions in perms.items():
        who = {"nkey": public_keys[name]} if public_keys else {"user": name, "password": password}
        users.append({**who, "permissions": permissions})
    return {"authorization": {"users": users}}


def write_seeds(folder: Path, names: list[str]) -> dict[str, str]:
    """A fresh NKey user seed per name in ``folder/<name>.nk`` (0600); name → public key."""
    folder.mkdir(parents=True, exist_ok=True)
    public = {}
    for name in names:
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        path = folder / f"{name}.nk"
        path.touch(mode=0o600)
        path.write_bytes(seed)
        public[name] = nkeys.from_seed(bytearray(seed)).public_key.decode()
    return public


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokenwire.natsperms",
        description="Print nats-server authorization for gateways (one user each) and workers.",
    )
    parser.add_argument("gateways", nargs="+", metavar="GATEWAY_ID")
    parser.add_argument(
        "--nkeys", type=Path, metavar="DIR", help="write a NKey seed per user into DIR"
    )
    args = parser.parse_args(argv)
    bad = [g for g in args.gateways if not SUBJECT_TOKEN.fullmatch(g) or g == WORKER_USER]
    if bad:
        parser.error(f"not a gateway id (letters, digits, '-', '_'; not 'worker'): {bad[0]!r}")
    keys = write_seeds(args.nkeys, [*args.gateways, WORKER_USER]) if args.nkeys else None
    block = authorization(args.gateways, keys)
    sys.stdout.write(orjson.dumps(block, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
