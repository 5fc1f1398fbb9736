"""W3C trace context across NATS headers, spans, and the container's environment.

Every service extracts the context from the incoming message's headers, opens its span
as a child, and injects the context into what it publishes next. An OTLP exporter is
installed when OTEL_EXPORTER_OTLP_ENDPOINT is set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()
_configured = False


def configure(service: str, exporter: SpanExporter | None = None) -> None:
    """Install the tracer provider once per process; OTLP export when configured.

    `exporter` adds one more destination, exported synchronously (tests use an in-memory
    one).
    """
    global _configured
    if _configured:
        return
    _configured = True
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context carried by NATS headers (an empty context when absent)."""
    return _propagator.extract(carrier=dict(headers or {}))


def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers with the current trace context added (traceparent, tracestate)."""
    carrier = dict(headers or {})
    _propagator.inject(carrier)
    return carrier


def current_trace_id() -> str | None:
    """The current span's trace id as 32 hex digits, or None outside a valid span."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return format(span_context.trace_id, "032x")


def trace_id_of(headers: Mapping[str, str] | None) -> str | None:
    """The trace id carried by a traceparent header, without opening a span."""
    span_context = trace.get_current_span(extract(headers)).get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None


def container_env() -> dict[str, str]:
    """TRACEPARENT/TRACESTATE for the container, from the current context."""
    carrier = inject()
    env = {"TRACEPARENT": carrier["traceparent"]} if "traceparent" in carrier else {}
    if carrier.get("tracestate"):
        env["TRACESTATE"] = carrier["tracestate"]
    return env
