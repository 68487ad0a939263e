"""The ``tokenwire`` command: dev, gateway, worker, simulate-dify (and more to come)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import typer

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = ["app", "main"]

app = typer.Typer(
    help="tokenwire: one full-duplex WebSocket in front of Dify.",
    no_args_is_help=True,
    add_completion=False,
)


def _process_settings(service: str, *, child: bool = False) -> Settings:
    """Settings, logging and tracing for a gateway or worker process; a bad setting or a
    missing extra ends it with one line (exit code 2) instead of a traceback. A ``child`` of
    ``--workers N`` / ``--processes N`` adds its ``pid`` to every log line: the children share
    the pod's log, and the supervisor names each child by its pid."""
    from pydantic import ValidationError

    from shared.logs import configure_logging
    from shared.settings import Settings
    from shared.tracing import TracingUnavailable, configure_tracing

    try:
        settings = Settings()
    except ValidationError as exc:
        # Name the field and the problem, never the value (it may be a secret).
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        typer.echo(f"refusing to start: bad configuration: {problems}", err=True)
        raise typer.Exit(2) from None
    configure_logging(service, settings.log_level, json=settings.log_json)
    if child:
        import logging

        pid = os.getpid()

        def add_pid(record: logging.LogRecord) -> bool:
            record.pid = pid
            return True

        for handler in logging.getLogger().handlers:
            handler.addFilter(add_pid)
    try:
        configure_tracing(service, settings.otel_endpoint)
    except TracingUnavailable as exc:
        typer.echo(f"refusing to start: {exc}", err=True)
        raise typer.Exit(2) from None
    return settings


@app.command()
def dev(
    host: str = typer.Option("127.0.0.1", help="Interface for the web page and WebSocket."),
    port: int = typer.Option(8000, help="Port for the web page and WebSocket."),
    data_dir: Path = typer.Option(
        Path(".tokenwire"), help="Where the embedded NATS keeps data, and logs/ each child's log."
    ),
    ready_timeout: float = typer.Option(
        30.0, min=1.0, help="Seconds to wait for everything to answer before giving up."
    ),
) -> None:
    """Everything on one machine: embedded NATS, a gateway, a worker (and the Dify simulator)."""
    from tokenwire.dev import run_dev

    raise typer.Exit(run_dev(host, port, data_dir, ready_timeout))


@app.command()
def gateway(
    host: str = typer.Option("0.0.0.0", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    ssl_certfile: Path | None = typer.Option(None, help="TLS certificate (serves wss://)."),
    ssl_keyfile: Path | None = typer.Option(None, help="TLS private key."),
    workers: int | None = typer.Option(
        None,
        min=1,
        help="Gateway processes sharing the port, each a gateway of its own, supervised "
        "and drained together (default: TOKENWIRE_GATEWAY_WORKERS, or 1).",
    ),
    fd: int | None = typer.Option(
        None, hidden=True, help="A listening socket inherited from `--workers N`."
    ),
) -> None:
    """A gateway (WebSocket, page, probes, metrics); connects to TOKENWIRE_NATS_URL."""
    import socket

    from gateway.server import DrainingServer, run_gateway_pod

    settings = _process_settings("gateway", child=fd is not None)
    if settings.auth == "none" and not settings.allow_insecure:
        typer.echo(
            "refusing to start: TOKENWIRE_AUTH=none lets anyone claim any user. "
            "Use TOKENWIRE_AUTH=jwt, or set TOKENWIRE_ALLOW_INSECURE=1 for a trusted network.",
            err=True,
        )
        raise typer.Exit(2)
    if bool(ssl_certfile) != bool(ssl_keyfile):
        typer.echo("refusing to start: give both --ssl-certfile and --ssl-keyfile", err=True)
        raise typer.Exit(2)
    count = workers or settings.gateway_workers
    if count > 1 and fd is None:
        tls = ["--ssl-certfile", str(ssl_certfile), "--ssl-keyfile", str(ssl_keyfile)]
        raise typer.Exit(run_gateway_pod(settings, host, port, count, tls if ssl_certfile else []))

    import uvicorn

    from gateway.app import create_app

    try:
        asgi_app = create_app(settings)
    except (ValueError, OSError) as exc:
        typer.echo(f"refusing to start: {exc}", err=True)
        raise typer.Exit(2) from None
    config = uvicorn.Config(
        asgi_app,
        host=host,
        port=port,
        # Frames above the protocol limit get an error frame; far above it, uvicorn closes
        # with 1009 before buffering them.
        ws_max_size=settings.max_frame_bytes * 4,
        # Protocol-level pings (browsers answer them without any code): they keep proxies from
        # closing idle sockets and find dead peers; no pong in time closes with 1011.
        # Frames are small JSON that compress poorly; deflate costs ~40 KiB per connection.
        ws_per_message_deflate=settings.ws_deflate,
        ws_ping_interval=settings.ping_interval_s,
        ws_ping_timeout=settings.pong_timeout_s,
        log_config=None,
        access_log=False,
        ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
        ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
        timeout_graceful_shutdown=10,
    )
    sockets = None
    if fd is not None:
        # One of `--workers N`: the supervisor's socket (its send buffer already set).
        sockets = [socket.socket(fileno=fd)]
    elif settings.send_buffer_bytes:
        from tokenwire.supervisor import listen

        sockets = [listen(host, port, send_buffer_bytes=settings.send_buffer_bytes)]
    server = DrainingServer(config, asgi_app)
    server.run(sockets=sockets)
    if not server.started:
        raise typer.Exit(3)


@app.command()
def worker(
    metrics_port: int = typer.Option(None, help="Port of /metrics and /healthz [default 9100]."),
    host: str = typer.Option("0.0.0.0", help="Interface for /metrics and /healthz."),
    processes: int | None = typer.Option(
        None,
        min=1,
        help="Worker processes, each a worker of its own, supervised and drained together "
        "behind one metrics port (default: TOKENWIRE_WORKER_PROCESSES, or 1).",
    ),
    uds: Path | None = typer.Option(
        None, hidden=True, help="Serve the probes on this Unix socket (one of `--processes N`)."
    ),
) -> None:
    """A worker: answers jobs from NATS by streaming from Dify."""
    settings = _process_settings("worker", child=uds is not None)
    if settings.dify_api_key is None:
        typer.echo(
            "refusing to start: DIFY_API_KEY is not set, so the worker cannot call Dify", err=True
        )
        raise typer.Exit(2)
    port = metrics_port or settings.worker_metrics_port
    count = processes or settings.worker_processes
    if count > 1 and uds is None:
        from worker.pod import run_worker_pod

        raise typer.Exit(run_worker_pod(settings, host, port, count))

    import uvicorn

    from worker.app import create_app
    from worker.server import WorkerServer

    server = WorkerServer(
        uvicorn.Config(
            create_app(settings),
            host=host,
            port=port,
            uds=str(uds) if uds else None,
            log_config=None,
            access_log=False,
            # Lifespan shutdown runs the drain: running answers get worker_drain_s to finish.
            timeout_graceful_shutdown=int(settings.worker_drain_s) + 10,
        )
    )
    server.run()
    if not server.started:
        raise typer.Exit(3)


@app.command("simulate-dify")
def simulate_dify(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(5001, help="Port to listen on."),
    token_delay_ms: float = typer.Option(20.0, help="Delay between answer tokens."),
    tokens: int = typer.Option(40, help="Answer length in tokens."),
    ping_interval: float = typer.Option(10.0, help="Seconds between keep-alive pings."),
    api_key: str | None = typer.Option(None, help="Require exactly this app key."),
    apps: str | None = typer.Option(
        None,
        help="Several apps by key: 'demo' (app-chat, app-agent, app-workflow, app-completion, "
        'app-human, …) or JSON {"app-…": {"mode": "workflow", "name": …}}. '
        "Replaces --api-key.",
    ),
) -> None:
    """A Dify Service API simulator: every app kind, its whole app-key Service API."""
    from tokenwire.simulator import SimConfig
    from tokenwire.simulator.apps import AppsError, parse_apps
    from tokenwire.simulator.server import run

    try:
        table = parse_apps(apps) if apps is not None else None
    except AppsError as exc:
        typer.echo(f"refusing to start: --apps: {exc}", err=True)
        raise typer.Exit(2) from None
    run(
        host,
        port,
        SimConfig(
            token_delay_ms=token_delay_ms,
            tokens=tokens,
            ping_interval_s=ping_interval,
            api_key=api_key,
            apps=table,
        ),
    )


jobs_app = typer.Typer(help="Operator view of queued, running and dead-lettered jobs.")
app.add_typer(jobs_app, name="jobs")


def _jobs_run(work: Any) -> Any:
    import asyncio

    from shared.settings import Settings
    from tokenwire.jobs import connect

    async def go() -> Any:
        async with connect(Settings()) as (js, kv):
            return await work(js, kv)

    try:
        return asyncio.run(go())
    except Exception as exc:  # a CLI says what went wrong in one line
        typer.echo(f"tokenwire jobs: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None


@jobs_app.command("list")
def jobs_list(
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    limit: int = typer.Option(500, help="At most this many rows."),
) -> None:
    """Queued, running and dead-lettered jobs: age, attempts, user, app, last error."""
    from tokenwire.jobs import list_jobs

    rows = _jobs_run(lambda js, kv: list_jobs(js, kv, limit=limit))
    if as_json:
        typer.echo(orjson.dumps([r.as_dict() for r in rows]).decode())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("STATE", "KEY", "ID", "USER", "APP", "AGE", "ATTEMPTS", "LAST ERROR")
    for r in rows:
        table.add_row(
            r.state,
            r.key,
            r.id,
            r.user,
            r.app or "-",
            f"{r.age_s:.0f}s",
            str(r.attempts),
            r.last_error or "",
        )
    Console().print(table)
    counts = {s: sum(1 for r in rows if r.state == s) for s in ("queued", "running", "dead")}
    typer.echo(", ".join(f"{n} {s}" for s, n in counts.items()))


@jobs_app.command("show")
def jobs_show(
    key: str = typer.Argument(..., help="The job's key (from `jobs list`) or its request id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Everything known of one job."""
    from tokenwire.jobs import show

    detail = _jobs_run(lambda js, kv: show(js, kv, key))
    if detail is None:
        typer.echo(f"no job {key!r}", err=True)
        raise typer.Exit(1)
    typer.echo(orjson.dumps(detail, option=0 if as_json else orjson.OPT_INDENT_2).decode())


@jobs_app.command("replay")
def jobs_replay(
    keys: list[str] = typer.Argument(None, help="Keys or request ids of dead jobs."),
    all_dead: bool = typer.Option(False, "--all-dead", help="Replay every dead-lettered job."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Put dead-lettered jobs back in the queue; their clients can resume them."""
    from tokenwire.jobs import replay

    if not keys and not all_dead:
        typer.echo("name the jobs to replay, or pass --all-dead", err=True)
        raise typer.Exit(2)
    done = _jobs_run(lambda js, kv: replay(js, None if all_dead else list(keys)))
    if as_json:
        typer.echo(orjson.dumps({"replayed": done}).decode())
    else:
        typer.echo(f"replayed {len(done)} job(s)" + "".join(f"\n  {k}" for k in done))
    if keys and not all_dead and len(done) < len(keys):
        raise typer.Exit(1)


@jobs_app.command("purge")
def jobs_purge(
    dead: bool = typer.Option(True, "--dead/--no-dead", help="Drop dead-lettered jobs."),
    queued: bool = typer.Option(False, "--queued", help="Also drop jobs waiting or running."),
    yes: bool = typer.Option(False, "--yes", help="Do not ask for confirmation."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Drop dead-lettered jobs (and, with --queued, everything still waiting)."""
    from tokenwire.jobs import purge

    what = " and ".join(w for w, on in (("dead-lettered", dead), ("queued/running", queued)) if on)
    if not yes and not typer.confirm(f"Drop all {what} jobs?"):
        raise typer.Exit(1)
    out = _jobs_run(lambda js, kv: purge(js, dead=dead, queued=queued))
    typer.echo(orjson.dumps(out).decode() if as_json else f"purged: {out}")


@app.command()
def chat(
    url: str = typer.Argument(
        "http://127.0.0.1:8000/", help="The gateway (http(s):// or ws(s)://)."
    ),
    user: str | None = typer.Option(
        None, help="User id when the gateway runs TOKENWIRE_AUTH=none."
    ),
    token: str | None = typer.Option(
        None, envvar="TOKENWIRE_TOKEN", help="Bearer token (JWT) for TOKENWIRE_AUTH=jwt."
    ),
) -> None:
    """Chat in the terminal: answers stream in as Markdown; /stop, /new, /quit."""
    from tokenwire.chat import run_chat

    raise typer.Exit(run_chat(url, user=user, token=token))


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app(prog_name="tokenwire")


if __name__ == "__main__":
    main()
    sys.exit(0)
