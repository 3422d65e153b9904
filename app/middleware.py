"""ASGI middleware: request metrics by route template, and a cap on request body size."""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import Metrics


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
                _route_template(scope), scope["method"], str(status)
            ).observe(time.perf_counter() - started)


def _route_template(scope: Scope) -> str:
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
            await self._reject(send, limit)
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

    async def _reject(self, send: Send, limit: int) -> None:
        self.metrics.requests_rejected.labels("too_large").inc()
        body = json.dumps({"detail": _too_large(limit)}).encode()
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
