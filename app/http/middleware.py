"""ASGI middleware: request metrics by route template, the concurrency cap, body size and pace
limits, test faults."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.concurrency import RequestSlots
from app.errors import error_body
from app.metrics import Metrics
from app.service.faults import parse_fault, requested_fault


class MetricsMiddleware:
    """Times every HTTP request into vae_request_duration_seconds{route, method, status}.

    `route` is the matched route's template (never the raw path, which would let clients
    create unbounded label values); requests that match no route count as "unmatched".
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.requests_in_flight.inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.requests_in_flight.dec()
            self.metrics.request_duration.labels(
                route_template(scope), scope["method"], str(status)
            ).observe(time.perf_counter() - started)


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return str(route.path)
    # Not routed yet (refused before routing, e.g. by the body size limit): match by hand.
    app = scope.get("app")
    return _match_template(getattr(getattr(app, "router", None), "routes", []), scope)


def _match_template(routes: list[Any], scope: Scope) -> str:
    for candidate in routes:
        # FastAPI keeps an included router whole (no `path`); its routes hold the templates.
        nested = getattr(candidate, "original_router", None)
        if nested is not None:
            template = _match_template(nested.routes, scope)
            if template != "unmatched":
                return template
        elif hasattr(candidate, "path"):
            match, _ = candidate.matches(scope)
            if match == Match.FULL:
                return str(candidate.path)
    return "unmatched"


# Probes and scrapes: answered within a reserve above the cap, so that an overloaded server
# still reports its health and the metrics that show the overload.
OPERATIONS_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"}
)


class ConcurrencyLimitMiddleware:
    """503 for a request that arrives while the worker's requests in progress, HTTP and gRPC
    together, are at VAE_MAX_CONCURRENCY (`slots`; the operations paths have a reserve beyond
    it). Installed inside MetricsMiddleware, so each refusal is timed by route and counted in
    vae_requests_rejected_total{reason="concurrency"}: the error ratio sees saturation
    (uvicorn's own limit_concurrency answered before the app, so its 503s were counted nowhere,
    and its connection count 503'd scrapes too)."""

    def __init__(self, app: ASGIApp, *, slots: RequestSlots, metrics: Metrics) -> None:
        self.app = app
        self.slots = slots
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.slots.enter(operations=scope["path"] in OPERATIONS_PATHS):
            self.metrics.requests_rejected.labels("concurrency").inc()
            response = JSONResponse(
                error_body(scope["path"], self.slots.refusal()),
                status_code=503,
                # The body is never read, so the connection cannot carry another request.
                headers={"Retry-After": "1", "Connection": "close"},
            )
            await response(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.slots.leave()


class BodySizeLimitMiddleware:
    """413 for a body over the limit, from Content-Length or while it streams in, so an
    oversized upload is refused before it is spooled to disk or memory. Multipart uploads
    and other bodies (JSON) have limits of their own."""

    def __init__(
        self, app: ASGIApp, *, multipart_limit: int, other_limit: int, metrics: Metrics
    ) -> None:
        self.app = app
        self.multipart_limit = multipart_limit
        self.other_limit = other_limit
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        multipart = headers.get(b"content-type", b"").startswith(b"multipart/")
        limit = self.multipart_limit if multipart else self.other_limit
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(send, limit, scope["path"])
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the body read, so the app's handlers answer it as a 413
                    # (and count it: counting here too would count it twice).
                    raise HTTPException(413, _too_large(limit))
            return message

        await self.app(scope, limited_receive, send)

    async def _reject(self, send: Send, limit: int, path: str) -> None:
        self.metrics.requests_rejected.labels("too_large").inc()
        body = json.dumps(error_body(path, _too_large(limit))).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _too_large(limit: int) -> str:
    return f"request body over {limit} bytes; send fewer or smaller files"


class BodyTimeoutMiddleware:
    """408 when a request body stalls: more than `timeout_s` between two received chunks.

    A client that trickles its upload (slowloris) would otherwise hold a connection, a task
    and a spooled part file for as long as it likes. The clock runs only while the app waits
    for body bytes, so a slow forward pass never counts against the client.
    """

    def __init__(self, app: ASGIApp, *, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = False

        async def paced_receive() -> Message:
            nonlocal body_done
            if body_done:
                # After the body, receive() only reports a disconnect: that may take forever.
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                # Raised inside the body read, so the app's handlers answer it (and count it).
                # The rest of the body is never read, so the connection cannot be reused.
                raise HTTPException(
                    408,
                    f"the request body stalled for over {self.timeout_s:g} s "
                    "(VAE_BODY_TIMEOUT_S); send it without pauses",
                    headers={"Connection": "close"},
                ) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, paced_receive, send)


class FaultInjectionMiddleware:
    """Test hook, installed only with VAE_ENABLE_TEST_HOOKS: the `X-Test-Fault` header makes
    this request's forward passes misbehave, to test how the service copes.

    `raise`: the forward pass raises (-> 500); `oom`: it raises torch.OutOfMemoryError (-> 413);
    `slow=<seconds>`: it sleeps first (-> 504 past VAE_REQUEST_TIMEOUT_S). Requests batched
    with a faulty one are retried without it and succeed. An unknown value is answered 400.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"x-test-fault")
        try:
            fault = 0.0 if header is None else parse_fault(header.decode("latin-1"))
        except ValueError as exc:
            response = JSONResponse(error_body(scope["path"], str(exc)), status_code=400)
            await response(scope, receive, send)
            return
        # Every request gets a value (0: no fault), so that all jobs carry the fault column
        # and batch together (app.service.predict).
        token = requested_fault.set(fault)
        try:
            await self.app(scope, receive, send)
        finally:
            requested_fault.reset(token)
