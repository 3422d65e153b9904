"""The JSON access log (VAE_ACCESS_LOG=json): one line per request, with what it asked of which
model and how it was answered."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.http.middleware import route_template
from app.http.request_context import NO_REQUEST, current_key_id, current_request_id
from app.service.work_log import WorkNote, current_work
from app.tracing import current_trace_id

LOGGER = "app.access"
logger = logging.getLogger(LOGGER)


class AccessLogMiddleware:
    """Writes the request's line on `app.access` once it is answered (a request whose client
    went away too, as 499): the route template (never the raw path), the status, the seconds
    from the request to the end of its response, the model work the service side noted
    (model, version, images, the micro-batch's images), the key id and, with `traced`, the
    trace id. Inside RequestIdMiddleware and, when tracing, the server span."""

    def __init__(self, app: ASGIApp, *, traced: bool = False) -> None:
        self.app = app
        self.traced = traced

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not logger.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        key_id = trace_id = None
        work = WorkNote()
        token = current_work.set(work)

        async def send_logged(message: Message) -> None:
            nonlocal status, key_id, trace_id
            if message["type"] == "http.response.start":
                # Read here, inside the middleware that set them (the key is reset after).
                status = message["status"]
                key = current_key_id.get()
                key_id = None if key == NO_REQUEST else key
                if self.traced:
                    trace_id = current_trace_id()
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            current_work.reset(token)
            line: dict[str, Any] = {
                "request_id": current_request_id.get(),
                "method": scope["method"],
                "route": route_template(scope),
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                "model": work.model,
                "model_version": work.model_version,
                "images": work.images,
                "batch_size": work.batch_size,
                "key_id": key_id,
            }
            if self.traced:
                line["trace_id"] = trace_id
            logger.info("access", extra={"access": line})


class JsonAccessFormatter(logging.Formatter):
    """An access record as one JSON object: its time (UTC, ISO 8601) and its fields."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        fields = getattr(record, "access", {})
        return orjson.dumps({"time": moment, **fields}).decode()
