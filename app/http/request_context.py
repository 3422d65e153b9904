"""Request ids: taken from X-Request-ID (or made), returned, and put on every log line of the
request, the server's own lines included."""

from __future__ import annotations

import copy
import logging
import re
import uuid
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import LOGGING_CONFIG

HEADER = "X-Request-ID"
_HEADER_KEY = HEADER.lower().encode()
# What a proxy or client may choose (a UUID, a trace id, a short tag); anything else would let a
# client write what it likes into the logs (newlines, escapes, megabytes), so it is replaced.
_VALID = re.compile(rb"[!-~]{1,128}")
NO_REQUEST = "-"

current_request_id: ContextVar[str] = ContextVar("request_id", default=NO_REQUEST)
# The id of the API key the request came with (app.http.auth), never the key.
current_key_id: ContextVar[str] = ContextVar("key_id", default=NO_REQUEST)


# The model version that answered the request, for its X-Model-Version header: a holder the
# middleware puts in place, filled by ServiceState.handle (the route may run in a copy of the
# context, where setting a variable would not reach the middleware; filling a list does).
VERSION_HEADER = "X-Model-Version"
_VERSION_KEY = VERSION_HEADER.lower().encode()
_served_version: ContextVar[list[str] | None] = ContextVar("served_version", default=None)


def record_version(model: str, version: str) -> None:
    """Say which model version answers the request being handled (the last one asked for)."""
    holder = _served_version.get()
    if holder is not None:
        holder[:] = [model, version]


def served_version() -> tuple[str, str] | None:
    """(model, version) recorded for the request being handled, if any."""
    holder = _served_version.get()
    return (holder[0], holder[1]) if holder else None


def request_id_of(header: bytes | None) -> str:
    """The client's id when it is 1-128 printable ASCII characters, else a new UUID4 (hex)."""
    if header is not None and _VALID.fullmatch(header):
        return header.decode("ascii")
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Outermost: every response carries X-Request-ID (and X-Model-Version when a model
    answered), and whatever runs for the request (the app, its error handlers, the server's
    access log) sees the id in `current_request_id`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(dict(scope["headers"]).get(_HEADER_KEY))
        token = current_request_id.set(request_id)
        holder: list[str] = []
        version_token = _served_version.set(holder)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() not in (_HEADER_KEY, _VERSION_KEY)
                ]
                headers.append((_HEADER_KEY, request_id.encode("ascii")))
                if holder:
                    headers.append((_VERSION_KEY, holder[1].encode("ascii")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _served_version.reset(version_token)
            current_request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id` and `record.key_id` (NO_REQUEST outside a request, or without
    a key) for the formats below."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get()
        record.key_id = current_key_id.get()
        return True


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def log_config(level: str, access_log: str = "text") -> dict[str, Any]:
    """logging.config.dictConfig's form of the service's logging: uvicorn's own loggers (its
    access log too) and the app's, every line with its request id; with `access_log` json, the
    JSON access lines (app.http.access_log) on stdout, where uvicorn's would be. uvicorn applies
    it in each worker process as well."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"request_id": {"()": RequestIdFilter}}
    for handler in config["handlers"].values():
        handler["filters"] = ["request_id"]
    config["formatters"]["default"]["fmt"] = LOG_FORMAT
    config["formatters"]["access"]["fmt"] = (
        "%(asctime)s %(levelprefix)s [%(request_id)s] %(client_addr)s key=%(key_id)s - "
        '"%(request_line)s" %(status_code)s'
    )
    if access_log == "json":
        config["formatters"]["access_json"] = {"()": "app.http.access_log.JsonAccessFormatter"}
        config["handlers"]["access_json"] = {
            "formatter": "access_json",
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stdout",
        }
        config["loggers"]["app.access"] = {"handlers": ["access_json"], "propagate": False}
    # The app's loggers ("app", "training", "models") print through the same handler.
    config["root"] = {"handlers": ["default"], "level": level.upper()}
    return config
