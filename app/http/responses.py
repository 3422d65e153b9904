"""The encode stage: images and results -> PNG, GIF or JSON, chosen by the Accept header."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from app.http.state import service
from app.service.imaging import Images, encode_gif, encode_png, make_grid_png, to_base64
from app.tracing import span

PNG, GIF, JSON = "image/png", "image/gif", "application/json"
# Encoding one small PNG (28x28: ~40 us) is cheaper on the event loop than the hop to a worker
# thread and back (/sample?n=1 at c=32 1.24x faster, p99 31 -> 22 ms:
# bench/results/compare-inline-png.md). Larger outputs (grids, several images, big images,
# GIFs) are encoded in the threadpool so they never stall other requests.
INLINE_MAX_PIXELS = 64 * 64


def negotiate(accept: str | None, offers: tuple[str, ...]) -> str:
    """The offer the client prefers by Accept q-values; the first offer when none matches."""
    best, best_q = offers[0], 0.0
    for item in (accept or "").split(","):
        media, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        for rank, offer in enumerate(offers):
            kind, _, _ = offer.partition("/")
            if media in (offer, f"{kind}/*", "*/*"):
                # Exact types beat wildcards at equal q; earlier offers beat later ones.
                score = q + (0.001 if media == offer else 0.0) - rank * 1e-6
                if score > best_q:
                    best, best_q = offer, score
    return best


def encoding(request: Request, images: int | None = None) -> AbstractContextManager[Any]:
    """The `encode response` span around building a response body (a no-op unless tracing)."""
    attributes = None if images is None else {"vae.images": images}
    return span(service(request).tracer, "encode response", attributes)


def images_json(images: Images) -> list[str]:
    return [to_base64(encode_png(image)) for image in images]


async def image_response(
    request: Request,
    images: Images,
    *,
    nrow: int,
    meta: dict[str, Any],
    headers: dict[str, str] | None = None,
    gif: bool = False,
) -> Response:
    """One PNG (a grid when several images), an animated GIF when allowed and asked for, or
    JSON with `images` as base64 PNGs plus `meta`; traced as `encode response`."""
    with encoding(request, len(images)):
        return await _encoded(request, images, nrow, meta, headers, gif)


async def _encoded(
    request: Request,
    images: Images,
    nrow: int,
    meta: dict[str, Any],
    headers: dict[str, str] | None,
    gif: bool,
) -> Response:
    offers = (PNG, JSON, GIF) if gif else (PNG, JSON)
    kind = negotiate(request.headers.get("accept"), offers)
    inline = len(images) == 1 and images[0].numel() <= INLINE_MAX_PIXELS
    if kind == JSON:
        encoded = images_json(images) if inline else await run_in_threadpool(images_json, images)
        return JSONResponse({**meta, "images": encoded}, headers=headers)
    if kind == GIF:
        return Response(
            await run_in_threadpool(encode_gif, images), media_type=GIF, headers=headers
        )
    if inline:
        body = encode_png(images[0])
    else:
        body = await run_in_threadpool(make_grid_png, images, nrow)
    return Response(body, media_type=PNG, headers=headers)
