"""HTTP routes, one module per group of endpoints."""

from typing import Any

from pydantic import BaseModel, Field

from app.http.schemas import ErrorBody


class ValidationErrorBody(BaseModel):
    """A 422: the service's own message, or FastAPI's list of invalid values."""

    detail: str | list[dict[str, Any]] = Field(
        description="What was wrong: a message, or one entry per invalid value (loc, msg, type)."
    )


_ERRORS = {
    400: "The request does not fit the model (e.g. a digit for an unconditional model).",
    403: "Model management is off (VAE_MODEL_CONTROL), or the key lacks the admin role.",
    404: "Unknown model, or a version not loaded.",
    408: "The request body stalled past VAE_BODY_TIMEOUT_S.",
    413: "Too large: bytes, pixels, images or files over the configured limits.",
    415: "Not a decodable image.",
    422: "Validation failed: out-of-range, non-finite, missing or malformed values.",
    503: "Not ready or overloaded; see Retry-After.",
    504: "The request waited past its deadline.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses an endpoint can answer."""
    return {
        code: {
            "model": ValidationErrorBody if code == 422 else ErrorBody,
            "description": _ERRORS[code],
        }
        for code in codes
    }


def image_content(json_model: type, gif: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entry for a 200 that is a PNG by default, JSON (or GIF) by Accept."""
    content: dict[str, Any] = {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "application/json": {"schema": {"$ref": f"#/components/schemas/{json_model.__name__}"}},
    }
    if gif:
        content["image/gif"] = {"schema": {"type": "string", "format": "binary"}}
    return {200: {"content": content, "description": "PNG (grid), or JSON with Accept."}}
