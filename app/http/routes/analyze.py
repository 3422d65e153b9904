"""Analysis of uploaded images: encoding, reconstruction, anomaly scoring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from app.http.responses import JSON, PNG, encoding, images_json, negotiate
from app.http.routes import error_responses, image_content
from app.http.routes.generate import DigitQuery, Invert
from app.http.schemas import AnomalyJSON, EncodeJSON, ReconstructJSON
from app.http.state import ModelDep, StateDep
from app.http.uploads import multipart_body, read_images
from app.service.imaging import Images, heatmap_png, pairs_grid_png, to_base64
from app.service.predict import Scored

router = APIRouter(tags=["analysis"])
UPLOAD_ERRORS = error_responses(400, 404, 408, 413, 415, 422, 503, 504)


@dataclass
class DigitUpload:
    """Uploaded images (N, 1, 28, 28) and the digit to read them as (None: the model infers)."""

    x: Images
    digit: int | None


async def digit_upload(
    request: Request,
    state: StateDep,
    handle: ModelDep,
    digit: DigitQuery = None,
    invert: Invert = False,
) -> DigitUpload:
    """The digit is checked against the model before the body is read."""
    handle.check_digit(digit)
    return DigitUpload(await read_images(request, state.settings, invert=invert), digit)


UploadDep = Annotated[DigitUpload, Depends(digit_upload)]


@router.post(
    "/encode",
    response_model=EncodeJSON,
    responses=UPLOAD_ERRORS,
    openapi_extra=multipart_body(True),
)
async def encode(request: Request, handle: ModelDep, upload: UploadDep) -> Response:
    """Posterior mean and log-variance of each uploaded image."""
    out = await handle.encode(upload.x, upload.digit)
    with encoding(request, len(upload.x)):
        items = [
            {
                "mu": out["mu"][i].tolist(),
                "logvar": out["logvar"][i].tolist(),
                "digit": int(out["digit"][i]) if "digit" in out else None,
                "digit_probability": float(out["digit_probability"][i]) if "digit" in out else None,
            }
            for i in range(len(upload.x))
        ]
        body = {"model": handle.name, "latent_dim": handle.entry.latent_dim, "items": items}
        return JSONResponse(EncodeJSON.model_validate(body).model_dump())


@router.post(
    "/reconstruct",
    responses={**image_content(ReconstructJSON), **UPLOAD_ERRORS},
    openapi_extra=multipart_body(True),
)
async def reconstruct(request: Request, handle: ModelDep, upload: UploadDep) -> Response:
    """Each uploaded image beside its reconstruction (one row per input)."""
    x = upload.x
    images, error = await handle.reconstruct(x, upload.digit)
    with encoding(request, len(images)):
        if negotiate(request.headers.get("accept"), (PNG, JSON)) == JSON:
            encoded = await run_in_threadpool(images_json, images)
            pairs = zip(encoded, error, strict=True)
            items = [{"image": img, "error": float(e)} for img, e in pairs]
            return JSONResponse({"model": handle.name, "items": items})
        return Response(await run_in_threadpool(pairs_grid_png, x, images), media_type=PNG)


@router.post(
    "/anomaly-score",
    response_model=AnomalyJSON,
    responses=UPLOAD_ERRORS,
    openapi_extra=multipart_body(True),
)
async def anomaly_score(
    request: Request,
    state: StateDep,
    handle: ModelDep,
    threshold: Annotated[
        float | None,
        Query(allow_inf_nan=False, description="Override the checkpoint's calibrated threshold."),
    ] = None,
    heatmap: Annotated[bool, Query(description="Include a per-pixel error heatmap.")] = False,
    invert: Invert = False,
) -> Response:
    """Anomaly score of each uploaded image: higher = more anomalous."""
    handle.check_anomaly()  # before the body is read
    x = await read_images(request, state.settings, invert=invert)
    scored = await handle.anomaly(x, threshold)
    with encoding(request, len(x)):
        return JSONResponse(await _anomaly_body(handle.name, scored, heatmap, len(x)))


async def _anomaly_body(model: str, scored: Scored, heatmap: bool, count: int) -> dict[str, Any]:
    heatmaps = (
        await run_in_threadpool(lambda: [to_base64(heatmap_png(m)) for m in scored.error_map])
        if heatmap
        else [None] * count
    )
    items = [
        {
            "score": score,
            "is_anomaly": scored.is_anomaly[i],
            "percentile": scored.percentile[i],
            "digit": None if scored.digits is None else scored.digits[i],
            "digit_probability": (
                None if scored.digit_probability is None else scored.digit_probability[i]
            ),
            "heatmap": heatmaps[i],
            "components": dict(
                zip(scored.statistic_names, scored.statistics[i].tolist(), strict=True)
            ),
        }
        for i, score in enumerate(scored.scores)
    ]
    body = {
        "model": model,
        "threshold": scored.threshold,
        "score_kind": scored.score_kind,
        "items": items,
    }
    return AnomalyJSON.model_validate(body).model_dump()
