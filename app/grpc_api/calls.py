"""What every gRPC call goes through, as every HTTP request goes through the middleware: its
request id, the API key, the concurrency cap, the metrics, one access-log line, and the one
mapping of the service's errors to gRPC status codes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from app.concurrency import RequestSlots
from app.errors import CLIENT_CLOSED_REQUEST, BadRequest, ServiceError, Unavailable
from app.http.api_keys import KeyRing
from app.http.auth import RateLimiter, key_of
from app.http.request_context import (
    NO_REQUEST,
    current_key_id,
    current_request_id,
    request_id_of,
)
from app.metrics import Metrics
from app.service.faults import parse_fault, requested_fault

logger = logging.getLogger("app.grpc")
access_logger = logging.getLogger("app.grpc.access")

SERVICE = "inference.GRPCInferenceService"
# vae_request_duration_seconds{method} of gRPC calls; `route` is the call's path (the method's
# full name, /inference.GRPCInferenceService/ModelInfer), `status` the HTTP status it maps to,
# so that dashboards and the 5xx error-ratio alert see both protocols alike.
METRIC_METHOD = "GRPC"
OK = 200
GATEWAY_TIMEOUT = 504
# The HTTP status of each refusal -> its gRPC status code (the reverse of the table that
# gRPC-HTTP gateways use).
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
INTERNAL_ERROR = "internal error; the request was not processed (see the server log)"

Answer = TypeVar("Answer")


class Unauthenticated(ServiceError):
    status_code = 401
    reason = "unauthorized"


class RateLimited(ServiceError):
    status_code = 429
    reason = "rate_limited"


class AtCapacity(Unavailable):
    reason = "concurrency"


@dataclass
class Gate:
    """The checks and accounts of one worker's gRPC calls; `slots` is shared with its HTTP
    server, `keys` and `limiter` are the HTTP side's (no key: every call is open)."""

    metrics: Metrics
    slots: RequestSlots
    keys: KeyRing
    limiter: RateLimiter | None
    open_operations: bool  # health calls open with keys set (not VAE_AUTH_OPERATIONS)
    test_hooks: bool = False  # VAE_ENABLE_TEST_HOOKS: honour the `x-test-fault` metadata

    async def call(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        answer: Callable[[], Awaitable[Answer]],
        *,
        operations: bool = False,
    ) -> Answer:
        """`answer()`, unless the key, the cap or the answer itself refuses the call, which is
        then aborted with the status code and message of the refusal."""
        route = f"/{SERVICE}/{method}"
        metadata = {
            key: value
            for key, value in context.invocation_metadata() or ()
            if isinstance(value, str)  # -bin keys carry bytes: none of ours
        }
        request_id = request_id_of(
            metadata["x-request-id"].encode() if "x-request-id" in metadata else None
        )
        id_token = current_request_id.set(request_id)
        key_token = current_key_id.set(NO_REQUEST)
        trailing = [("x-request-id", request_id)]
        status = 500
        started = time.perf_counter()
        self.metrics.requests_in_flight.inc()
        try:
            result = await self._checked(answer, metadata, operations=operations)
            status = OK
            context.set_trailing_metadata(trailing)
            return result
        except ServiceError as exc:
            status = exc.status_code
            self.metrics.requests_rejected.labels(exc.reason).inc()
            if isinstance(exc, Unavailable):
                trailing.append(("retry-after", str(exc.retry_after)))
            context.set_trailing_metadata(trailing)
            await context.abort(STATUS_CODES.get(status, grpc.StatusCode.INTERNAL), exc.detail)
            raise  # abort raises; this is never reached
        except asyncio.CancelledError:
            # gRPC cancels the call when its deadline passes (DEADLINE_EXCEEDED: 504) or the
            # client cancels it (499, as a client's hang-up over HTTP).
            remaining = context.time_remaining()
            status = (
                GATEWAY_TIMEOUT
                if remaining is not None and remaining <= 0
                else CLIENT_CLOSED_REQUEST
            )
            raise
        except Exception as exc:
            logger.error("unhandled error in %s: %r", route, exc, exc_info=exc)
            context.set_trailing_metadata(trailing)
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR)
            raise  # abort raises; this is never reached
        finally:
            self.metrics.requests_in_flight.dec()
            self.metrics.request_duration.labels(route, METRIC_METHOD, str(status)).observe(
                time.perf_counter() - started
            )
            if access_logger.isEnabledFor(logging.INFO):  # context.peer() is not free
                access_logger.info(
                    '%s key=%s - "%s %s" %d', context.peer(), current_key_id.get(), METRIC_METHOD,
                    route, status,
                )  # fmt: skip
            current_key_id.reset(key_token)
            current_request_id.reset(id_token)

    async def _checked(
        self,
        answer: Callable[[], Awaitable[Answer]],
        metadata: dict[str, str],
        *,
        operations: bool,
    ) -> Answer:
        key_id = self._authorize(metadata, operations=operations)
        if key_id is not None:
            current_key_id.set(key_id)
        if self.test_hooks:
            # As X-Test-Fault over HTTP; every call gets a value (0: none), so that its jobs
            # carry the same columns as the HTTP requests' and batch with them.
            fault = metadata.get("x-test-fault")
            try:
                requested_fault.set(0.0 if fault is None else parse_fault(fault))
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
        if not self.slots.enter(operations=operations):
            raise AtCapacity(self.slots.refusal())
        try:
            return await answer()
        finally:
            self.slots.leave()

    def _authorize(self, metadata: dict[str, str], *, operations: bool) -> str | None:
        """The id of the call's valid key (None: no keys are set, or an open health call), or
        a refusal: 401 without a valid key, 429 past the key's rate."""
        if not self.keys:
            return None
        open_call = operations and self.open_operations
        presented = key_of(metadata.get("authorization", ""), metadata.get("x-api-key"))
        key = self.keys.find(presented) if presented is not None else None
        if key is None:
            if open_call:  # a bad key on an open call: answered as if none was sent
                return None
            raise Unauthenticated(
                "this API key is not valid"
                if presented is not None
                else "this call needs an API key: send the metadata `authorization: Bearer KEY` "
                "(tritonclient: headers={'authorization': 'Bearer KEY'})"
            )
        self.metrics.key_requests.labels(key.key_id).inc()
        if self.limiter is not None:
            wait_s = self.limiter.retry_after_s(key.key_id)
            if wait_s > 0:
                raise RateLimited(
                    f"key {key.key_id!r} is over its rate of {self.limiter.rate_per_s:g} "
                    f"requests/s (VAE_RATE_LIMIT_PER_S); retry in {wait_s:.2f} s"
                )
        return key.key_id
