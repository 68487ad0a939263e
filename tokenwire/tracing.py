"""Optional OpenTelemetry tracing, off unless ``TOKENWIRE_OTEL_ENDPOINT`` is set.

With an endpoint (an OTLP/HTTP traces URL such as ``http://collector:4318/v1/traces``), the
process exports its spans there in batches. The gateway starts a trace per ``chat`` and puts its
context (``traceparent``) in the job's NATS headers; the worker's FastStream telemetry middleware
continues it, so one trace shows the gateway, the wait in JetStream, the worker and Dify.
Without an endpoint nothing is configured and the OpenTelemetry API stays a no-op.
"""

from __future__ import annotations

import atexit

__all__ = ["configure_tracing"]


def configure_tracing(service: str, endpoint: str | None) -> bool:
    """Export this process's spans to ``endpoint``; returns whether tracing is on."""
    if not endpoint:
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"tokenwire-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)
    return True
