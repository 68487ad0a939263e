"""The worker under one changed setting, for levers that would need a code change to try.

``tokenwire worker`` pulls jobs in batches (``worker/waiting_line.py`` ``job_intake``). This
launcher builds the very same worker app from the very same settings with another pull batch
(patched into ``worker.app``'s namespace, nothing else changed), so the benchmark can show
what a batch is worth (``--pull-batch 1``: one pull round trip to JetStream per job, as
before batches):

    python -m bench.worker_variant --metrics-port P --pull-batch 1

It is a benchmark tool only; a lever that wins should become a real worker setting.
"""

from __future__ import annotations

import argparse
import gc
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--pull-batch", type=int, default=None, help="default: as shipped")
    parser.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    parser.add_argument("--lag-probe", action="store_true", help="report loop lag and GC pauses")
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() once the app is built: the collector stops re-scanning startup objects",
    )
    args = parser.parse_args()

    import uvicorn
    from faststream.nats import PullSub

    import worker.app as worker_app
    from shared.logs import configure_logging
    from shared.settings import Settings

    def pull_sub(*pos: Any, **kw: Any) -> PullSub:
        kw["batch_size"] = args.pull_batch
        return PullSub(*pos, **kw)

    if args.pull_batch is not None:
        worker_app.PullSub = pull_sub  # type: ignore[attr-defined,assignment]
    settings = Settings()
    configure_logging("worker", settings.log_level, json=settings.log_json)
    app: Any = worker_app.create_app(settings)
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    if args.lag_probe:
        from bench.gateway_variant import _LagProbe

        app = _LagProbe(app)
    uvicorn.run(
        app,
        host=args.host,
        port=args.metrics_port,
        loop=args.loop,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
