"""Similarity search: the training images nearest to an upload in the model's latent space."""

from __future__ import annotations

import math
from typing import Annotated

import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from app.imaging import encode_png, make_grid_png, to_base64
from app.responses import JSON, PNG, negotiate
from app.routes import error_responses, image_content
from app.routes.generate import DigitQuery, Invert
from app.schemas import SimilarJSON
from app.state import ModelDep, StateDep
from app.uploads import multipart_body, read_images

router = APIRouter(tags=["analysis"])
MAX_K = 64


@router.post(
    "/similar",
    responses={
        **image_content(SimilarJSON),
        **error_responses(400, 404, 408, 413, 415, 422, 503, 504),
    },
    openapi_extra=multipart_body(True),
)
async def similar(
    request: Request,
    state: StateDep,
    handle: ModelDep,
    k: Annotated[int, Query(ge=1, le=MAX_K, description="Neighbours per image.")] = 8,
    digit: DigitQuery = None,
    invert: Invert = False,
) -> Response:
    """The k training images nearest to each upload in latent space: JSON by default, or
    with Accept: image/png a grid, one row per upload (the upload, then its neighbours)."""
    index = handle.latent_index()  # before reading the upload, which could not be answered
    handle.check_digit(digit)
    x = await read_images(request, state.settings, invert=invert)
    found = await handle.similar(x, k, digit)
    indices, distances = found["indices"][:, :k], found["distances"][:, :k]
    labels = index.labels[indices.to(index.device)].cpu()
    # A digit with fewer than k training images pads its row with inf: not neighbours.
    rows = [
        [(i, d, y) for i, d, y in zip(*row, strict=True) if math.isfinite(d)]
        for row in zip(indices.tolist(), distances.tolist(), labels.tolist(), strict=True)
    ]
    if negotiate(request.headers.get("accept"), (JSON, PNG)) == PNG:
        return Response(await run_in_threadpool(_grid, x, rows, index.images, k), media_type=PNG)
    pngs = await run_in_threadpool(
        lambda: {i: to_base64(encode_png(_unit(index.images[i]))) for row in rows for i, *_ in row}
    )
    items = [
        {
            "digit": int(found["digit"][q]) if "digit" in found else None,
            "digit_probability": float(found["digit_probability"][q]) if "digit" in found else None,
            "neighbours": [
                {"index": i, "label": y, "distance": d, "image": pngs[i]} for i, d, y in row
            ],
        }
        for q, row in enumerate(rows)
    ]
    body = {
        "model": handle.name,
        "distance": index.distance,
        "search": index.summary()["search"],
        "items": items,
    }
    return JSONResponse(SimilarJSON.model_validate(body).model_dump())


def _unit(image: Tensor) -> Tensor:
    """A uint8 (28, 28) index image as (1, 28, 28) floats in [0, 1]."""
    return image.float().div(255.0)[None]


def _grid(x: Tensor, rows: list[list[tuple[int, float, int]]], images: Tensor, k: int) -> bytes:
    """One row per query: the query, then its neighbours, black where there are fewer than k."""
    tiles = torch.zeros(len(rows), k + 1, 1, 28, 28)
    for q, row in enumerate(rows):
        tiles[q, 0] = x[q]
        for column, (i, *_) in enumerate(row, start=1):
            tiles[q, column] = _unit(images[i])
    return make_grid_png(tiles.flatten(0, 1), k + 1)
