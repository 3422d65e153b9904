"""Benchmark-only endpoints, registered when VAE_ENABLE_BENCH_ROUTES is on (never by default)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.http.responses import PNG
from app.http.state import StateDep
from app.http.uploads import read_images
from app.service.imaging import gradient_png

router = APIRouter(prefix="/bench", tags=["benchmark"])

# A fixed 28x28 digit-sized gradient, encoded once: the answer costs no model and no codec.
_FLOOR_PNG = gradient_png()


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
