"""Generation: sampling the prior, decoding latents, interpolating, variations of an input."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app.errors import InvalidInput
from app.http.responses import image_response
from app.http.routes import error_responses, image_content
from app.http.schemas import (
    DecodeRequest,
    GeneratedJSON,
    InterpolateRequest,
    InterpolationEnd,
    InterpolationJSON,
)
from app.http.state import ModelDep, ModelQuery, StateDep, VersionQuery, service
from app.http.uploads import multipart_body, read_images
from app.service.imaging import decode_base64_image
from app.service.predict import Endpoint, Generated, PriorName, draw_seed

router = APIRouter(tags=["generation"])

Nrow = Annotated[int, Query(ge=1, le=4096, description="Images per row of the PNG grid.")]
Temperature = Annotated[
    float,
    Query(gt=0, le=2, allow_inf_nan=False, description="Scales the prior's std (0 < t <= 2)."),
]
SeedQuery = Annotated[
    int | None,
    Query(ge=0, le=2**63 - 1, description="Makes the response reproducible; drawn if omitted."),
]
DigitQuery = Annotated[int | None, Query(ge=0, le=9, description="Digit (conditional models).")]
PriorQuery = Annotated[
    PriorName | None,
    Query(
        description="Where z is drawn from: `fitted`, the checkpoint's Gaussian mixture of real "
        "digits' latents (the default when it has one), or `standard`, N(0, I)."
    ),
]
Invert = Annotated[bool, Query(description="Flip black-on-white input to white-on-black.")]
GENERATED = {
    **image_content(GeneratedJSON),
    **error_responses(400, 404, 408, 413, 415, 422, 503, 504),
}


def _check_count(n: int, limit: int) -> None:
    if n > limit:
        raise InvalidInput(f"n={n} is over this server's limit of {limit} (VAE_MAX_SAMPLES)")


async def _respond(
    request: Request, model: str, generated: Generated, seed: int, nrow: int
) -> Response:
    meta = {"model": model, "seed": seed, "digits": generated.digits}
    headers = {"X-Seed": str(seed)}
    if generated.prior is not None:
        meta["prior"] = generated.prior
        headers["X-Prior"] = generated.prior
    return await image_response(request, generated.images, nrow=nrow, meta=meta, headers=headers)


@router.post("/sample", responses=GENERATED)
async def sample(
    request: Request,
    model: ModelQuery = None,
    n: Annotated[int, Query(ge=1, le=4096, description="Images to draw.")] = 1,
    digit: DigitQuery = None,
    temperature: Temperature = 1.0,
    seed: SeedQuery = None,
    nrow: Nrow = 8,
    prior: PriorQuery = None,
    version: VersionQuery = None,
) -> Response:
    """Draw n images from the prior, of one digit or (conditional models) of random digits."""
    state = service(request)
    handle = state.handle(model, version)
    _check_count(n, state.settings.max_samples)
    seed = draw_seed() if seed is None else seed
    generated = await handle.sample(n, digit, temperature, seed, prior)
    return await _respond(request, handle.name, generated, seed, nrow)


@router.post("/decode", responses=GENERATED)
async def decode(
    request: Request, state: StateDep, handle: ModelDep, body: DecodeRequest, nrow: Nrow = 8
) -> Response:
    """Decode latent vectors into images."""
    _check_count(len(body.z), state.settings.max_samples)
    images, digits = await handle.decode_rows(body.z, body.digit)
    meta = {"model": handle.name, "seed": 0, "digits": digits}
    return await image_response(request, images, nrow=nrow, meta=meta, headers={"X-Seed": "0"})


@router.post(
    "/interpolate",
    responses={
        **image_content(InterpolationJSON, gif=True),
        **error_responses(400, 404, 408, 413, 415, 422, 503, 504),
    },
)
async def interpolate(
    request: Request, state: StateDep, handle: ModelDep, body: InterpolateRequest
) -> Response:
    """Frames between two digits, latents or images: a PNG strip, a GIF, or JSON."""
    seed = draw_seed() if body.seed is None else body.seed
    settings = state.settings

    def endpoint(end: InterpolationEnd) -> Endpoint:
        image = None
        if end.image is not None:
            image = decode_base64_image(
                end.image,
                max_bytes=settings.max_upload_bytes,
                max_pixels=settings.max_image_pixels,
                invert=end.invert,
            )
        return Endpoint(z=end.z, image=image, digit=end.digit)

    start = await run_in_threadpool(endpoint, body.start)
    end = await run_in_threadpool(endpoint, body.end)
    generated = await handle.interpolate(start, end, body.steps, body.method, seed, body.prior)
    meta = {
        "model": handle.name,
        "seed": seed,
        "digits": generated.digits,
        "latents": generated.latents.tolist(),
        "prior": generated.prior,
    }
    return await image_response(
        request,
        generated.images,
        nrow=body.steps,
        meta=meta,
        headers={"X-Seed": str(seed), "X-Prior": str(generated.prior)},
        gif=True,
    )


@router.post("/variations", responses=GENERATED, openapi_extra=multipart_body(many=False))
async def variations(
    request: Request,
    state: StateDep,
    handle: ModelDep,
    n: Annotated[int, Query(ge=1, le=4096, description="Variations to draw.")] = 8,
    scale: Annotated[
        float, Query(ge=0, le=3, allow_inf_nan=False, description="Multiplies the posterior std.")
    ] = 1.0,
    seed: SeedQuery = None,
    digit: DigitQuery = None,
    invert: Invert = False,
    nrow: Nrow = 8,
) -> Response:
    """Samples of q(z | x) around an uploaded image, decoded."""
    _check_count(n, state.settings.max_samples)
    handle.check_digit(digit)
    x = await read_images(request, state.settings, invert=invert, many=False)
    seed = draw_seed() if seed is None else seed
    generated = await handle.variations(x, n, scale, seed, digit)
    return await _respond(request, handle.name, generated, seed, nrow)
