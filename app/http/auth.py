"""Access control: which routes need an API key and of which role (401, 403), and a per-key
rate limit (429)."""

from __future__ import annotations

import math
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import error_body
from app.http.api_keys import ADMIN, USER, KeyRing
from app.http.middleware import OPERATIONS_PATHS
from app.http.request_context import current_key_id
from app.metrics import Metrics

# The page and the API's own description load without a key (the page then asks for one).
PAGE_PATHS = frozenset({"/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PAGE_PREFIXES = ("/static/",)
# Routes that change or probe the server itself rather than ask a model: the admin key's.
ADMIN_PREFIXES = ("/bench/", "/v2/repository/")
# Model management: POST /models/{name}/load and /unload.
ADMIN_SUFFIXES = ("/load", "/unload")


class RateLimiter:
    """A token bucket per key id: `rate_per_s` requests a second on average, `burst` at once."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, at)

    def retry_after_s(self, key_id: str) -> float:
        """0 when the request may go (a token is taken), else seconds until one is free."""
        now = time.monotonic()
        tokens, at = self._buckets.get(key_id, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
        if tokens >= 1.0:
            self._buckets[key_id] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key_id] = (tokens, now)
        return (1.0 - tokens) / self.rate_per_s


def required_role(path: str, *, open_operations: bool) -> str | None:
    """The role `path` needs: None for the page and (when open) the operations paths."""
    if path in PAGE_PATHS or path.startswith(PAGE_PREFIXES):
        return None
    if path in OPERATIONS_PATHS:  # probes and scrapes: open unless VAE_AUTH_OPERATIONS
        return None if open_operations else USER
    if path.startswith(ADMIN_PREFIXES):
        return ADMIN
    if path.startswith("/models/") and path.endswith(ADMIN_SUFFIXES):
        return ADMIN
    return USER


def presented_key(scope: Scope) -> str | None:
    """`Authorization: Bearer KEY` (TorchServe's, tritonclient's headers=) or `X-API-Key: KEY`
    (LitServe's)."""
    headers = dict(scope["headers"])
    api_key = headers.get(b"x-api-key")
    return key_of(
        headers.get(b"authorization", b"").decode("latin-1"),
        api_key.decode("latin-1") if api_key is not None else None,
    )


def key_of(authorization: str, api_key: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` value, else of an `X-API-Key` value; the gRPC
    server reads the same two from its metadata."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return api_key or None


class ApiKeyMiddleware:
    """401 without a valid key (with WWW-Authenticate), 403 for a key without the route's role,
    429 past the key's rate; the key's id (never the key) goes to the logs and the metrics."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: KeyRing,
        open_operations: bool,
        limiter: RateLimiter | None,
        metrics: Metrics,
    ) -> None:
        self.app = app
        self.keys = keys
        self.open_operations = open_operations
        self.limiter = limiter
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        role = required_role(scope["path"], open_operations=self.open_operations)
        presented = presented_key(scope)
        if role is None and presented is None:
            await self.app(scope, receive, send)
            return
        key = self.keys.find(presented) if presented is not None else None
        if key is None:
            if role is None:  # a bad key on an open route: answered as if none was sent
                await self.app(scope, receive, send)
                return
            challenge = 'Bearer realm="vae-serve"'
            if presented is not None:
                challenge += ', error="invalid_token"'
            message = (
                "this API key is not valid"
                if presented is not None
                else "this route needs an API key: send `Authorization: Bearer KEY` or "
                "`X-API-Key: KEY`"
            )
            await self._refuse(scope, receive, send, 401, "unauthorized", message, challenge)
            return
        self.metrics.key_requests.labels(key.key_id).inc()
        # Set before the role and rate checks, so that their refusals' log lines name the key.
        token = current_key_id.set(key.key_id)
        try:
            await self._admit(scope, receive, send, key.key_id, key.role != ADMIN and role == ADMIN)
        finally:
            current_key_id.reset(token)

    async def _admit(
        self, scope: Scope, receive: Receive, send: Send, key_id: str, needs_admin: bool
    ) -> None:
        if needs_admin:
            message = f"key {key_id!r} may not call {scope['path']}: it needs an admin key"
            await self._refuse(scope, receive, send, 403, "forbidden", message)
            return
        if self.limiter is not None:
            wait_s = self.limiter.retry_after_s(key_id)
            if wait_s > 0:
                message = (
                    f"key {key_id!r} is over its rate of {self.limiter.rate_per_s:g} "
                    "requests/s (VAE_RATE_LIMIT_PER_S); retry after the Retry-After seconds"
                )
                await self._refuse(
                    scope, receive, send, 429, "rate_limited", message, retry_after=wait_s
                )
                return
        await self.app(scope, receive, send)

    async def _refuse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        status: int,
        reason: str,
        message: str,
        challenge: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.metrics.requests_rejected.labels(reason).inc()
        # The body is never read, so the connection cannot carry another request.
        headers = {"Connection": "close"}
        if challenge is not None:
            headers["WWW-Authenticate"] = challenge
        if retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        response = JSONResponse(error_body(scope["path"], message), status, headers=headers)
        await response(scope, receive, send)
