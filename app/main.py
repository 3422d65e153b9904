"""Assembles the FastAPI app: lifespan (load, warm up, batchers), middleware, error mapping."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from app.batching import MicroBatcher
from app.errors import ServiceError, Unavailable
from app.inference import run_op, warm_up
from app.metrics import Metrics
from app.middleware import BodySizeLimitMiddleware, MetricsMiddleware
from app.registry import LoadedModel, Registry
from app.routes import analyze, generate, system
from app.settings import Settings
from app.state import ServiceState

logger = logging.getLogger("app")
MAX_REPORTED_ERRORS = 20


def _batcher(entry: LoadedModel, settings: Settings, metrics: Metrics) -> MicroBatcher:
    return MicroBatcher(
        entry.name,
        lambda op, inputs: run_op(entry, op, inputs),
        metrics,
        max_batch_images=settings.max_batch_images,
        max_queue_images=settings.max_queue_images,
        max_wait_s=settings.max_batch_wait_ms / 1000,
        timeout_s=settings.request_timeout_s,
    )


def _prepare(state: ServiceState, registry: Registry | None) -> Registry:
    """Load (unless given) and warm up every model; runs in a worker thread."""
    if state.settings.torch_threads:
        torch.set_num_threads(state.settings.torch_threads)
    registry = registry or Registry.load(state.settings)
    for entry in registry.models.values():
        warm_up(entry)
    return registry


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    """The service; loads the configured checkpoints at startup unless `registry` is given."""
    settings = settings or Settings()
    state = ServiceState(settings=settings, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = await run_in_threadpool(_prepare, state, registry)
        for entry in loaded.models.values():
            batcher = _batcher(entry, settings, state.metrics)
            batcher.start()
            state.batchers[entry.name] = batcher
            state.metrics.model_info.labels(
                entry.name, entry.model.config.architecture, str(entry.device)
            ).set(1)
        state.registry = loaded
        state.ready = True
        logger.info("ready: serving %s", ", ".join(loaded.models))
        try:
            yield
        finally:
            state.ready = False
            for batcher in state.batchers.values():
                await batcher.stop()

    app = FastAPI(
        title="VAE digits",
        version="0.1.0",
        summary="Sample, encode, decode, interpolate and anomaly-score MNIST digits with VAEs.",
        lifespan=lifespan,
    )
    app.state.service = state
    for module in (generate, analyze, system):
        app.include_router(module.router)
    _install_error_handlers(app, state)
    app.add_middleware(
        BodySizeLimitMiddleware,
        # Room for the most files at the most bytes each, plus the multipart framing.
        multipart_limit=settings.max_files * settings.max_upload_bytes + 2**20,
        other_limit=settings.max_json_bytes,
        metrics=state.metrics,
    )
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app


def _install_error_handlers(app: FastAPI, state: ServiceState) -> None:
    """The one place where domain errors become HTTP statuses."""
    rejected = state.metrics.requests_rejected

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        rejected.labels(exc.reason).inc()
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Unavailable) else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        rejected.labels("invalid").inc()
        # One error per bad value would let a few MB of NaNs in z buy a response of hundreds
        # of MB: the first few say what is wrong. They echo the offending input, which may be
        # NaN or inf (JSON bodies may hold those literals): those are sent as text.
        errors = exc.errors()[:MAX_REPORTED_ERRORS]
        return JSONResponse({"detail": _finite(jsonable_encoder(errors))}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code >= 400 and exc.status_code != 404:
            rejected.labels("too_large" if exc.status_code == 413 else "invalid").inc()
        return await http_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.error("unhandled error on %s: %r", request.url.path, exc, exc_info=exc)
        return JSONResponse(
            {"detail": "internal error; the request was not processed (see the server log)"},
            status_code=500,
        )


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by its text ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
