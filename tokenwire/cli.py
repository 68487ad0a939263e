"""The ``tokenwire`` command: dev, gateway, worker, simulate-dify (and more to come)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    help="tokenwire: one full-duplex WebSocket in front of Dify.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def dev(
    host: str = typer.Option("127.0.0.1", help="Interface for the web page and WebSocket."),
    port: int = typer.Option(8000, help="Port for the web page and WebSocket."),
    data_dir: Path = typer.Option(Path(".tokenwire"), help="Where the embedded NATS keeps data."),
) -> None:
    """Everything on one machine: embedded NATS, a gateway, a worker (and the Dify simulator)."""
    from tokenwire.dev import run_dev

    raise typer.Exit(run_dev(host, port, data_dir))


@app.command()
def gateway(
    host: str = typer.Option("0.0.0.0", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    ssl_certfile: Path | None = typer.Option(None, help="TLS certificate (serves wss://)."),
    ssl_keyfile: Path | None = typer.Option(None, help="TLS private key."),
) -> None:
    """One gateway process (WebSocket, page, probes, metrics); connects to TOKENWIRE_NATS_URL."""
    import uvicorn

    from gateway.app import create_app
    from shared.logs import configure_logging
    from shared.settings import Settings

    settings = Settings()
    configure_logging("gateway", settings.log_level, json=settings.log_json)
    if settings.auth == "none" and not settings.allow_insecure:
        typer.echo(
            "refusing to start: TOKENWIRE_AUTH=none lets anyone claim any user. "
            "Use TOKENWIRE_AUTH=jwt, or set TOKENWIRE_ALLOW_INSECURE=1 for a trusted network.",
            err=True,
        )
        raise typer.Exit(2)
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        # Frames above the protocol limit get an error frame; far above it, uvicorn closes
        # with 1009 before buffering them.
        ws_max_size=settings.max_frame_bytes * 4,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        log_config=None,
        access_log=False,
        ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
        ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
        timeout_graceful_shutdown=10,
    )


@app.command()
def worker(
    metrics_port: int = typer.Option(None, help="Port of /metrics and /healthz [default 9100]."),
    host: str = typer.Option("0.0.0.0", help="Interface for /metrics and /healthz."),
) -> None:
    """One worker process: answers jobs from NATS by streaming from Dify."""
    import uvicorn

    from shared.logs import configure_logging
    from shared.settings import Settings
    from worker.app import create_app

    settings = Settings()
    configure_logging("worker", settings.log_level, json=settings.log_json)
    if settings.dify_api_key is None:
        typer.echo("DIFY_API_KEY is not set: the worker cannot call Dify.", err=True)
        raise typer.Exit(2)
    uvicorn.run(
        create_app(settings),
        host=host,
        port=metrics_port or settings.worker_metrics_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
    )


@app.command("simulate-dify")
def simulate_dify(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(5001, help="Port to listen on."),
    token_delay_ms: float = typer.Option(20.0, help="Delay between answer tokens."),
    tokens: int = typer.Option(40, help="Answer length in tokens."),
    ping_interval: float = typer.Option(10.0, help="Seconds between keep-alive pings."),
    api_key: str | None = typer.Option(None, help="Require exactly this app key."),
) -> None:
    """A Dify Service API simulator (chat-messages streaming, stop, messages)."""
    from tokenwire.simulator import SimConfig
    from tokenwire.simulator.server import run

    run(
        host,
        port,
        SimConfig(
            token_delay_ms=token_delay_ms,
            tokens=tokens,
            ping_interval_s=ping_interval,
            api_key=api_key,
        ),
    )


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app(prog_name="tokenwire")


if __name__ == "__main__":
    main()
    sys.exit(0)
