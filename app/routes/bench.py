"""Benchmark-only endpoints, registered when VAE_ENABLE_BENCH_ROUTES is on (never by default)."""

from __future__ import annotations

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.imaging import encode_png
from app.responses import PNG
from app.state import StateDep
from app.uploads import read_images

router = APIRouter(prefix="/bench", tags=["benchmark"])

# A fixed 28x28 digit-sized gradient, encoded once: the answer costs no model and no codec.
_FLOOR_PNG = encode_png(torch.linspace(0.0, 1.0, 28 * 28).view(1, 28, 28))


@router.post("/floor", response_class=Response, responses={200: {"content": {PNG: {}}}})
async def floor() -> Response:
    """A constant pre-encoded PNG: the HTTP stack's own cost, the ceiling for /sample."""
    return Response(_FLOOR_PNG, media_type=PNG)


@router.post("/upload-floor")
async def upload_floor(request: Request, state: StateDep) -> JSONResponse:
    """Reads and decodes the upload exactly as /anomaly-score does, then answers constant JSON:
    the ceiling for the upload routes (the cost of everything but the model)."""
    images = await read_images(request, state.settings, invert=False)
    return JSONResponse({"images": len(images)})
