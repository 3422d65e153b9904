"""Similarity search: the training images nearest to an upload in the model's latent space."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from app.http.responses import JSON, PNG, encoding, negotiate
from app.http.routes import error_responses, image_content
from app.http.routes.generate import DigitQuery, Invert
from app.http.schemas import SimilarJSON
from app.http.state import ModelDep, StateDep
from app.http.uploads import multipart_body, read_images
from app.service.imaging import Images, encode_png, neighbours_grid_png, to_base64
from app.service.predict import ModelHandle, Neighbours

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
    handle.latent_index()  # before reading the upload, which could not be answered
    handle.check_digit(digit)
    x = await read_images(request, state.settings, invert=invert)
    found = await handle.similar(x, k, digit)
    with encoding(request, len(x)):
        return await _similar_response(request, handle, x, k, found)


async def _similar_response(
    request: Request, handle: ModelHandle, x: Images, k: int, found: Neighbours
) -> Response:
    if negotiate(request.headers.get("accept"), (JSON, PNG)) == PNG:

        def grid() -> bytes:
            rows = [[handle.training_image(n.index) for n in row] for row in found.rows]
            return neighbours_grid_png(x, rows, k + 1)

        return Response(await run_in_threadpool(grid), media_type=PNG)
    pngs = await run_in_threadpool(
        lambda: {
            n.index: to_base64(encode_png(handle.training_image(n.index)))
            for row in found.rows
            for n in row
        }
    )
    items = [
        {
            "digit": None if found.digits is None else found.digits[q],
            "digit_probability": (
                None if found.digit_probability is None else found.digit_probability[q]
            ),
            "neighbours": [
                {"index": n.index, "label": n.label, "distance": n.distance, "image": pngs[n.index]}
                for n in row
            ],
        }
        for q, row in enumerate(found.rows)
    ]
    body = {
        "model": handle.name,
        "distance": found.distance,
        "search": found.search,
        "items": items,
    }
    return JSONResponse(SimilarJSON.model_validate(body).model_dump())
