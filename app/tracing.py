"""Optional OpenTelemetry tracing (the `otel` extra), set up from the standard OTEL_* variables
and off unless OTEL_TRACES_EXPORTER names an exporter; both sides of the app use it.

Off, the app holds no tracer (None) and every `span()` is a shared no-op context, so the
service costs what it did without tracing; opentelemetry is imported only when it is on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

TRACER_NAME = "vae-serve"
# Where exporter packages register their names (the SDK's own auto-configuration looks here).
EXPORTER_GROUP = "opentelemetry_traces_exporter"
# `otlp` is the OTLP exporter of OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL (the spec's default:
# http/protobuf, the exporter the `otel` extra installs).
OTLP_BY_PROTOCOL = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}
INSTALL_HINT = "pip install 'vae-serve[otel]'"
_OFF: AbstractContextManager[None] = nullcontext()


class TracingError(ValueError):
    """OTEL_* variables ask for traces that cannot be made (an unknown exporter, no SDK)."""


def exporter_names(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The exporters OTEL_TRACES_EXPORTER names; none (tracing off) when it is unset or `none`,
    or when OTEL_SDK_DISABLED=true."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [name.strip() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    return [name for name in names if name and name != "none"]


def exporters(environ: Mapping[str, str] = os.environ) -> list[Callable[[], SpanExporter]]:
    """The exporter classes the environment asks for, checked: a name no installed package
    provides is a TracingError that says what to install or set."""
    found = []
    for name in exporter_names(environ):
        wanted = name
        if name == "otlp":
            protocol = environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ).strip()
            if protocol not in OTLP_BY_PROTOCOL:
                raise TracingError(
                    f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not an OTLP protocol; use "
                    + " or ".join(OTLP_BY_PROTOCOL)
                )
            wanted = OTLP_BY_PROTOCOL[protocol]
        matches = list(entry_points(group=EXPORTER_GROUP, name=wanted))
        if not matches:
            known = sorted({point.name for point in entry_points(group=EXPORTER_GROUP)})
            raise TracingError(
                f"OTEL_TRACES_EXPORTER={name!r}: no installed package provides that exporter "
                f"(installed: {', '.join(known) or 'none'}); {INSTALL_HINT} for otlp and "
                "console, or unset OTEL_TRACES_EXPORTER to turn tracing off"
            )
        found.append(matches[0].load())
    if found:
        try:
            import opentelemetry.sdk.trace  # noqa: F401
        except ImportError as exc:
            raise TracingError(
                f"OTEL_TRACES_EXPORTER asks for traces but the OpenTelemetry SDK is not "
                f"installed: {INSTALL_HINT}, or unset OTEL_TRACES_EXPORTER"
            ) from exc
    return found


def provider_from_env(environ: Mapping[str, str] = os.environ) -> TracerProvider | None:
    """The SDK's tracer provider exporting through a batching processor to each exporter the
    environment names (resource from OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, sampler from
    OTEL_TRACES_SAMPLER, the exporters' own OTEL_EXPORTER_* settings), or None: tracing off."""
    factories = exporters(environ)
    if not factories:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()  # reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": TRACER_NAME}))
    provider = TracerProvider(resource=resource)
    for factory in factories:
        provider.add_span_processor(BatchSpanProcessor(factory()))
    return provider


def span(
    tracer: Tracer | None, name: str, attributes: Mapping[str, Any] | None = None
) -> AbstractContextManager[Any]:
    """A child span of the current one around a stage of the request; a no-op when off."""
    if tracer is None:
        return _OFF
    return tracer.start_as_current_span(name, attributes=attributes)


def current_trace_id() -> str | None:
    """The current span's trace id (32 hex digits), None outside a recorded span."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None
