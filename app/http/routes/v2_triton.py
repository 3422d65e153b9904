"""Triton's extensions of the v2 protocol that its tools read: per-model statistics
(`perf_analyzer`, `get_inference_statistics`) and model configuration (`get_model_config`).

Included before the v2 router: `GET /v2/models/stats` would otherwise be taken for the
metadata of a model named `stats`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.http.routes.v2 import V2ModelDep, _errors, _models, model_route
from app.http.state import StateDep

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])


class Duration(BaseModel):
    count: int
    ns: int = Field(description="Their total duration, in nanoseconds.")


class InferenceStatistics(BaseModel):
    success: Duration = Field(description="Requests answered, from decoded to computed.")
    fail: Duration = Field(description="Requests refused or failed after naming this model.")
    queue: Duration = Field(description="Each request's wait in the model's queue.")
    compute_input: Duration = Field(description="Joining each pass's batch of inputs.")
    compute_infer: Duration = Field(description="The forward passes, device copies included.")
    compute_output: Duration = Field(description="Slicing each request's rows of the outputs.")
    cache_hit: Duration
    cache_miss: Duration


class BatchStatistics(BaseModel):
    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


class ModelStatistics(BaseModel):
    name: str
    version: str
    last_inference: int = Field(description="Milliseconds since the epoch; 0: none yet.")
    inference_count: int = Field(description="Rows (images, latents) of successful requests.")
    execution_count: int = Field(description="Forward passes that ran any of its requests.")
    inference_stats: InferenceStatistics
    batch_stats: list[BatchStatistics]


class StatisticsResponse(BaseModel):
    model_stats: list[ModelStatistics] = Field(
        description="Counted per server process since the model was loaded."
    )


class ModelConfig(BaseModel):
    """Triton's model configuration (its JSON); only what applies here."""

    name: str
    platform: str
    max_batch_size: int = Field(description="0: no implicit batch dimension in `dims`.")
    input: list[dict[str, Any]]
    output: list[dict[str, Any]]
    dynamic_batching: dict[str, Any]
    instance_group: list[dict[str, Any]]


@router.get("/models/stats", response_model=StatisticsResponse, responses=_errors(503))
async def all_statistics(state: StateDep) -> dict[str, Any]:
    """Triton's inference statistics of every v2 model."""
    models = _models(state).values()
    return {"model_stats": [model.stats.describe(model.name, model.version) for model in models]}


@model_route(
    "GET", "/stats", on=router, response_model=StatisticsResponse, responses=_errors(404, 503)
)
async def model_statistics(model: V2ModelDep) -> dict[str, Any]:
    """Triton's inference statistics of one v2 model."""
    return {"model_stats": [model.stats.describe(model.name, model.version)]}


@model_route("GET", "/config", on=router, response_model=ModelConfig, responses=_errors(404, 503))
async def model_config(model: V2ModelDep, state: StateDep) -> dict[str, Any]:
    """Triton's model configuration of one v2 model."""
    return model.config(state.settings)
