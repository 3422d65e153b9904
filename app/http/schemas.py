"""Request and response bodies, as pydantic models: they are also the OpenAPI documentation."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The prior is N(0, I), so latents beyond a few units decode to noise anyway; the cap keeps
# float32 arithmetic finite (1e308 is valid JSON but inf as float32, and slerp squares norms).
MAX_LATENT_VALUE = 1e4
LatentValue = Annotated[
    float, Field(allow_inf_nan=False, ge=-MAX_LATENT_VALUE, le=MAX_LATENT_VALUE)
]
Digit = Annotated[int, Field(ge=0, le=9)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
MAX_LATENT_ROWS = 4096
MAX_LATENT_DIM = 1024


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    detail: str = Field(description="What was wrong and how to fix it.")


# fail_fast: a list stops at its first bad item. Without it a 4 MB body of 1M bad values
# costs the server 1M error objects, over 1 GB and seconds of CPU, before a 422 is sent.
LatentRow = Annotated[
    list[LatentValue], Field(min_length=1, max_length=MAX_LATENT_DIM, fail_fast=True)
]


class DecodeRequest(Strict):
    z: list[LatentRow] = Field(
        min_length=1,
        max_length=MAX_LATENT_ROWS,
        fail_fast=True,
        description="Latent vectors, one row of latent_dim floats per image.",
    )
    digit: (
        Digit | Annotated[list[Digit], Field(max_length=MAX_LATENT_ROWS, fail_fast=True)] | None
    ) = Field(
        default=None,
        description="Conditional models: one digit for all rows, or one per row. "
        "Unconditional models: omit.",
    )


class InterpolationEnd(Strict):
    z: list[LatentValue] | None = Field(
        default=None, max_length=MAX_LATENT_DIM, fail_fast=True, description="A latent vector."
    )
    image: str | None = Field(
        default=None, description="A base64-encoded image (or data: URL), encoded first."
    )
    digit: Digit | None = Field(
        default=None,
        description="The digit (conditional models). Alone, the endpoint is this digit with "
        "the z shared by both ends, drawn from the prior with `seed`.",
    )
    invert: bool = Field(default=False, description="Flip a black-on-white image.")

    @model_validator(mode="after")
    def _one_source(self) -> InterpolationEnd:
        if self.z is not None and self.image is not None:
            raise ValueError("give either 'z' or 'image', not both")
        if self.z is None and self.image is None and self.digit is None:
            raise ValueError("give 'z', 'image' or 'digit'")
        return self


class InterpolateRequest(Strict):
    start: InterpolationEnd
    end: InterpolationEnd
    steps: int = Field(default=10, ge=2, le=64, description="Frames, both ends included.")
    method: Literal["slerp", "linear"] = Field(
        default="slerp", description="slerp keeps frames at the prior's typical norm."
    )
    seed: Seed | None = Field(default=None, description="Seeds the shared prior z of digit ends.")
    prior: Literal["fitted", "standard"] | None = Field(
        default=None,
        description="Where digit ends draw z from: `fitted` (the checkpoint's fitted prior, the "
        "default when it has one) or `standard`, N(0, I).",
    )


class ImagesJSON(BaseModel):
    model: str
    images: list[str] = Field(description="Base64-encoded 28x28 grayscale PNGs, in order.")


class GeneratedJSON(ImagesJSON):
    seed: int
    digits: list[int] | None = Field(description="Digit of each image; null if unconditional.")
    prior: Literal["fitted", "standard"] | None = Field(
        default=None,
        description="/sample, /interpolate: the prior z was drawn from (also the X-Prior header).",
    )


class InterpolationJSON(GeneratedJSON):
    latents: list[list[float]] = Field(description="The latent of each frame.")


class EncodedItem(BaseModel):
    mu: list[float]
    logvar: list[float]
    digit: int | None
    digit_probability: float | None = Field(
        description="p(digit | x) when the digit was predicted; 1.0 when it was given."
    )


class EncodeJSON(BaseModel):
    model: str
    latent_dim: int
    items: list[EncodedItem]


class ReconstructedItem(BaseModel):
    image: str = Field(description="Base64 PNG of the reconstruction.")
    error: float = Field(description="Mean squared pixel error, pixels in [0, 1].")


class ReconstructJSON(BaseModel):
    model: str
    items: list[ReconstructedItem]


class AnomalyItem(BaseModel):
    score: float = Field(description="Higher = more anomalous.")
    is_anomaly: bool = Field(description="score > threshold.")
    percentile: float | None = Field(
        description="Where the score falls among validation scores, 0-100 (null when the "
        "checkpoint has no calibration quantiles)."
    )
    digit: int | None
    digit_probability: float | None
    heatmap: str | None = Field(
        default=None, description="Base64 PNG of the squared pixel error (heatmap=true)."
    )
    components: dict[str, float] | None = Field(
        default=None,
        description="The statistics the score compares with real digits of the predicted digit "
        "(the model card's anomaly.statistics), for explaining a score; the score is their "
        "Mahalanobis distance from the real digits' values.",
    )


class AnomalyJSON(BaseModel):
    model: str
    threshold: float
    score_kind: str
    items: list[AnomalyItem]


class ModelsJSON(BaseModel):
    default: str
    models: list[dict[str, Any]]


class Neighbour(BaseModel):
    index: int = Field(description="Row of the training image in the checkpoint's latent index.")
    label: int = Field(description="Its digit.")
    distance: float = Field(
        description="Latent distance to the query: 1 - cosine similarity (0..2) or Euclidean, "
        "as the model card's index.distance says."
    )
    image: str = Field(description="Base64 PNG of the training image, 28x28 grayscale.")


class SimilarItem(BaseModel):
    digit: int | None = Field(
        description="Conditional models: the digit searched within (given, else predicted)."
    )
    digit_probability: float | None = Field(
        description="p(digit | x) when the digit was predicted; 1.0 when it was given."
    )
    neighbours: list[Neighbour] = Field(description="Nearest first.")


class SimilarJSON(BaseModel):
    model: str
    distance: Literal["cosine", "euclidean"]
    search: str = Field(description="Which training images are candidates.")
    items: list[SimilarItem] = Field(description="One per uploaded image, in order.")
