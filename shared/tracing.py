"""Optional OpenTelemetry tracing, off unless ``TOKENWIRE_OTEL_ENDPOINT`` is set.

With an endpoint (an OTLP/HTTP traces URL such as ``http://collector:4318/v1/traces``), the
process exports its spans there in batches. The gateway starts a trace per ``chat`` and puts its
context (``traceparent``) in the job's NATS headers; the worker's FastStream telemetry middleware
continues it, so one trace shows the gateway, the wait in JetStream, the worker and Dify.

Without an endpoint nothing here is imported beyond the OpenTelemetry API (a dependency, and a
no-op on its own): the SDK, the exporter and FastStream's middleware come with the ``otel``
extra, and a plain ``pip install tokenwire`` must start without them. With an endpoint but
without the extra, :class:`TracingUnavailable` says in one line what to install.
"""

from __future__ import annotations

import atexit
from typing import Any

__all__ = ["TracingUnavailable", "configure_tracing", "nats_middlewares"]

_INSTALL_HINT = "pip install 'tokenwire[otel]'"


class TracingUnavailable(RuntimeError):
    """``TOKENWIRE_OTEL_ENDPOINT`` is set but the ``otel`` extra is not installed."""

    def __init__(self, missing: str) -> None:
        super().__init__(
            f"TOKENWIRE_OTEL_ENDPOINT is set, but tracing needs the otel extra "
            f"({missing} is missing): {_INSTALL_HINT}, or unset TOKENWIRE_OTEL_ENDPOINT"
        )


def configure_tracing(service: str, endpoint: str | None) -> bool:
    """Export this process's spans to ``endpoint``; returns whether tracing is on."""
    if not endpoint:
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingUnavailable(exc.name or str(exc)) from None

    provider = TracerProvider(resource=Resource.create({"service.name": f"tokenwire-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)
    return True


def nats_middlewares(endpoint: str | None) -> tuple[Any, ...]:
    """FastStream's NATS telemetry middleware when tracing is on, else nothing.

    Imported only here: ``faststream.nats.opentelemetry`` needs the SDK's semantic conventions,
    which only the ``otel`` extra installs.
    """
    if not endpoint:
        return ()
    try:
        from faststream.nats.opentelemetry import NatsTelemetryMiddleware
    except ImportError as exc:
        raise TracingUnavailable(exc.name or str(exc)) from None
    return (NatsTelemetryMiddleware(),)
