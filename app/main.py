"""Assembles the FastAPI app: lifespan (load, warm up, batchers), middleware, error mapping."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import torch
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from app.concurrency import RequestSlots
from app.errors import CLIENT_CLOSED_REQUEST, V2_PREFIX, ServiceError, Unavailable, error_body
from app.http.access_log import AccessLogMiddleware
from app.http.api_keys import KeyRing
from app.http.auth import ApiKeyMiddleware, RateLimiter
from app.http.content_coding import ContentCodingMiddleware
from app.http.middleware import (
    BodySizeLimitMiddleware,
    BodyTimeoutMiddleware,
    ConcurrencyLimitMiddleware,
    FaultInjectionMiddleware,
    MetricsMiddleware,
)
from app.http.request_context import RequestIdMiddleware
from app.http.routes import analyze, bench, generate, repository, similar, system, ui, v2, v2_triton
from app.http.state import ServiceState
from app.http.v2_models import newest, versioned
from app.metrics import Metrics
from app.service.batching import MicroBatcher
from app.service.inference import run_op, warm_up
from app.service.registry import LoadedModel, Registry
from app.service.repository import ModelRepository
from app.settings import Settings
from app.tracing import TRACER_NAME, provider_from_env

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

logger = logging.getLogger("app")
MAX_REPORTED_ERRORS = 20
MAX_ECHOED_ITEMS, MAX_ECHOED_DEPTH, MAX_ECHOED_CHARS = 16, 4, 256
# Requests to /healthz, /readyz and /metrics answered past VAE_MAX_CONCURRENCY: enough for
# the probes and a scrape or two at once, while a flood of them stays bounded.
OPERATIONS_RESERVE = 16


def _batcher(
    entry: LoadedModel, settings: Settings, metrics: Metrics, tracer: Tracer | None
) -> MicroBatcher:
    return MicroBatcher(
        entry.name,
        lambda op, inputs: run_op(entry, op, inputs),
        metrics,
        max_batch_images=settings.max_batch_images,
        max_queue_images=settings.max_queue_images,
        max_wait_s=settings.max_batch_wait_ms / 1000,
        timeout_s=settings.request_timeout_s,
        tracer=tracer,
    )


def _prepare(state: ServiceState, registry: Registry | None) -> Registry:
    """Load (unless given) and warm up every model; runs in a worker thread."""
    registry = registry or Registry.load(state.settings)
    for entry in registry.models.values():
        warm_up(entry)
    return registry


def create_app(
    settings: Settings | None = None,
    registry: Registry | None = None,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """The service; loads the configured checkpoints at startup unless `registry` is given.
    Traces go to `tracer_provider` if given, else where the OTEL_* variables say (if on)."""
    settings = settings or Settings()
    provider = tracer_provider if tracer_provider is not None else provider_from_env()
    tracer = None if provider is None else provider.get_tracer(TRACER_NAME)
    if settings.torch_threads:
        # Here, in the thread that builds the app (the event loop's), not in the loading thread:
        # OpenMP's thread count is per calling thread, and the event loop's own torch calls
        # (the prior's draws) with torch's default team beside the inference thread's single
        # one made /sample 4x slower at c=1 on a busy machine.
        torch.set_num_threads(settings.torch_threads)
    state = ServiceState(settings=settings, metrics=Metrics(), tracer=tracer)

    # One count of requests in progress for both servers of this worker, HTTP and gRPC.
    slots = RequestSlots(settings.max_concurrency, OPERATIONS_RESERVE)
    keys = KeyRing(settings.keys)
    limiter = None
    if keys and settings.rate_limit_per_s > 0:
        limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst_requests)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        grpc_server = None
        if settings.grpc_port is not None:
            # Imported only when asked for: grpcio and tritonclient are the `grpc` extra.
            from app.grpc_api.calls import Gate
            from app.grpc_api.server import start_grpc_server

            # Started before the models are warmed up (and, in a worker process, loaded), so
            # that ServerLive answers meanwhile and ServerReady says not ready.
            gate = Gate(
                state.metrics,
                slots,
                keys,
                limiter,
                open_operations=not settings.auth_operations,
                test_hooks=settings.enable_test_hooks,
            )
            grpc_server = await start_grpc_server(
                state, gate, port=settings.grpc_port, server_version=app.version
            )
        repository: ModelRepository | None = None
        poller = None
        try:
            loaded = await run_in_threadpool(_prepare, state, registry)
            repository = ModelRepository(
                settings,
                loaded,
                lambda entry: _batcher(entry, settings, state.metrics, tracer),
                state.metrics,
            )
            state.repository = repository

            def rebuild_v2() -> None:
                assert repository is not None
                state.v2_versions = versioned(repository, state.v2_versions)
                state.v2_models = newest(repository, state.v2_versions)

            rebuild_v2()
            repository.listeners.append(rebuild_v2)
            if settings.model_control == "poll":
                poller = asyncio.get_running_loop().create_task(repository.poll())
            # What startup allocated (torch, the models, the app) lives as long as the process:
            # frozen, the cyclic GC stops rescanning it, which paused every request for ~200 ms
            # once per few thousand requests (p99 at c=32 went from ~140 ms to ~35 ms; bench/).
            gc.collect()
            gc.freeze()
            state.ready = True
            logger.info("ready: serving %s", ", ".join(loaded.models))
            yield
        finally:
            if grpc_server is not None:
                # New calls are refused; those in progress finish, with the batchers running.
                await grpc_server.stop(settings.shutdown_drain_s)
            state.ready = False
            if poller is not None:
                poller.cancel()
            if repository is not None:
                await repository.close()
            state.metrics.close()
            # Export the spans left; a provider the caller gave is the caller's to shut down.
            if tracer_provider is not None:
                tracer_provider.force_flush()
            elif provider is not None:
                provider.shutdown()

    app = FastAPI(
        title="VAE digits",
        version="0.1.0",
        summary="Sample, encode, decode, interpolate and anomaly-score MNIST digits with VAEs.",
        lifespan=lifespan,
    )
    app.state.service = state
    # v2_triton first: its GET /v2/models/stats would otherwise match v2's /v2/models/{name}.
    for module in (generate, analyze, similar, system, repository, ui, v2_triton, v2):
        app.include_router(module.router)
    app.mount(ui.STATIC_PATH, ui.static_files(), name="static")
    if settings.enable_bench_routes:
        app.include_router(bench.router)
    _install_error_handlers(app, state)
    # Inside the body size limit, which so bounds the compressed bytes; this one bounds the
    # inflated ones.
    app.add_middleware(
        ContentCodingMiddleware,
        prefix=V2_PREFIX,
        limit=settings.max_json_bytes,
        setting="VAE_MAX_JSON_BYTES",
    )
    app.add_middleware(
        BodySizeLimitMiddleware,
        # Room for the most files at the most bytes each, plus the multipart framing.
        multipart_limit=settings.max_files * settings.max_upload_bytes + 2**20,
        other_limit=settings.max_json_bytes,
        metrics=state.metrics,
    )
    app.add_middleware(BodyTimeoutMiddleware, timeout_s=settings.body_timeout_s)
    if settings.enable_test_hooks:
        logger.warning("test hooks are on: X-Test-Fault headers make requests fail on purpose")
        app.add_middleware(FaultInjectionMiddleware)
    app.add_middleware(ConcurrencyLimitMiddleware, slots=slots, metrics=state.metrics)
    if keys:
        app.add_middleware(
            ApiKeyMiddleware,
            keys=keys,
            open_operations=not settings.auth_operations,
            limiter=limiter,
            metrics=state.metrics,
        )
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    if settings.access_log == "json":
        app.add_middleware(AccessLogMiddleware, traced=tracer is not None)
    if tracer is not None:
        from app.http.trace_context import TracingMiddleware  # imports opentelemetry

        app.add_middleware(TracingMiddleware, tracer=tracer)
    app.add_middleware(RequestIdMiddleware)
    return app


def _install_error_handlers(app: FastAPI, state: ServiceState) -> None:
    """The one place where domain errors become HTTP statuses."""
    rejected = state.metrics.requests_rejected

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        rejected.labels(exc.reason).inc()
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Unavailable) else None
        body = error_body(request.url.path, exc.detail)
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        rejected.labels("invalid").inc()
        # One error per bad value would let a few MB of NaNs in z buy a response of hundreds
        # of MB: the first few say what is wrong. They echo the offending input, which may be
        # NaN or inf (JSON bodies may hold those literals): those are sent as text.
        errors = [
            {**error, "input": _clipped(error["input"])} if "input" in error else error
            for error in exc.errors()[:MAX_REPORTED_ERRORS]
        ]
        body = error_body(request.url.path, _finite(jsonable_encoder(errors)))
        return JSONResponse(body, status_code=422)

    @app.exception_handler(ClientDisconnect)
    async def client_disconnected(request: Request, exc: ClientDisconnect) -> Response:
        return _client_gone(request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if isinstance(exc.__cause__, ClientDisconnect):
            # FastAPI's own body parsing (JSON routes) wraps the disconnect in a 400.
            return _client_gone(request)
        if exc.status_code >= 400 and exc.status_code != 404:
            reason = {408: "body_timeout", 413: "too_large"}.get(exc.status_code, "invalid")
            rejected.labels(reason).inc()
        body = error_body(request.url.path, exc.detail)
        if "detail" in body:
            return await http_exception_handler(request, exc)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.error("unhandled error on %s: %r", request.url.path, exc, exc_info=exc)
        message = "internal error; the request was not processed (see the server log)"
        return JSONResponse(error_body(request.url.path, message), status_code=500)


def _client_gone(request: Request) -> Response:
    """The client hung up before its request was read: one log line, and a 499 that reaches no
    one but times and counts the request as the client's doing (never a 5xx, never a
    traceback: any client could otherwise fire the error-ratio alert and flood the log)."""
    logger.info(
        "client disconnected before its request was read: %s %s", request.method, request.url.path
    )
    return Response(status_code=CLIENT_CLOSED_REQUEST)


def _clipped(value: Any, depth: int = 0) -> Any:
    """An echoed input cut to a few nested items: one error must not echo a 2 MB list, or a
    list nested 500 deep that the JSON encoder would recurse through."""
    if isinstance(value, str) and len(value) > MAX_ECHOED_CHARS:
        return value[:MAX_ECHOED_CHARS] + "..."
    if isinstance(value, dict | list | tuple):
        if depth >= MAX_ECHOED_DEPTH or len(value) > MAX_ECHOED_ITEMS:
            kind = "an object" if isinstance(value, dict) else "an array"
            return f"<{kind} of {len(value)} items, not shown>"
        if isinstance(value, dict):
            return {key: _clipped(item, depth + 1) for key, item in value.items()}
        return [_clipped(item, depth + 1) for item in value]
    return value


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by its text ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
