"""Benchmark-only endpoints, registered when VAE_ENABLE_BENCH_ROUTES is on (never by default)."""

from __future__ import annotations

import torch
from fastapi import APIRouter
from fastapi.responses import Response

from app.imaging import encode_png
from app.responses import PNG

router = APIRouter(prefix="/bench", tags=["benchmark"])

# A fixed 28x28 digit-sized gradient, encoded once: the answer costs no model and no codec.
_FLOOR_PNG = encode_png(torch.linspace(0.0, 1.0, 28 * 28).view(1, 28, 28))


@router.post("/floor", response_class=Response, responses={200: {"content": {PNG: {}}}})
async def floor() -> Response:
    """A constant pre-encoded PNG: the HTTP stack's own cost, the ceiling for /sample."""
    return Response(_FLOOR_PNG, media_type=PNG)
