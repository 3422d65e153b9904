"""Tracing's HTTP end (installed only when tracing is on): a server span per request, continuing
the client's W3C `traceparent`, and the trace named back in the response."""

from __future__ import annotations

from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.http.middleware import route_template
from app.http.request_context import current_request_id

# W3C Trace Context level 2's response header: version-trace id-span id-flags of the server
# span, so a client that sent no traceparent can still find the trace.
RESPONSE_HEADER = b"traceresponse"


class TracingMiddleware:
    """Inside RequestIdMiddleware: the span `METHOD /route/template` (kind SERVER) whose parent is
    the context the request's `traceparent` / `tracestate` carry (OTEL_PROPAGATORS' propagators;
    a new trace without one), with the HTTP attributes of OpenTelemetry's semantic conventions
    and the request id; 5xx answers mark it an error. The stages below it are its children."""

    def __init__(self, app: ASGIApp, *, tracer: Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        method = scope["method"]
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.path": scope["path"],
            "vae.request_id": current_request_id.get(),
        }
        with self.tracer.start_as_current_span(
            method, context=propagate.extract(carrier), kind=SpanKind.SERVER, attributes=attributes
        ) as span:

            async def send_traced(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = message["status"]
                    route = route_template(scope)
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                    context = span.get_span_context()
                    value = (
                        f"00-{trace.format_trace_id(context.trace_id)}-"
                        f"{trace.format_span_id(context.span_id)}-{context.trace_flags:02x}"
                    )
                    headers = [*message.get("headers", []), (RESPONSE_HEADER, value.encode())]
                    message = {**message, "headers": headers}
                await send(message)

            await self.app(scope, receive, send_traced)
