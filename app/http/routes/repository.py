"""Model management at runtime (VAE_MODEL_CONTROL=explicit or poll; the admin key's when keys
are set): load a model's checkpoint folder again, unload it, list the repository. REST under
/models/{name}, and Triton's model repository extension under /v2/repository, which
tritonclient's `get_model_repository_index`, `load_model` and `unload_model` call."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from app.errors import ManagementOff, NotReady
from app.http.routes import error_responses
from app.http.routes.v2 import _errors as v2_errors
from app.http.state import ServiceState, StateDep
from app.http.v2_models import OPS
from app.service.repository import ModelRepository

router = APIRouter(tags=["model management"])
ModelName = Annotated[
    str,
    Path(description="A model of the repository (POST /v2/repository/index), or one of its v2 "
         "models `<model>-<op>`, which stands for the whole model."),
]  # fmt: skip


class LoadedJSON(BaseModel):
    name: str
    version: str = Field(description="The version now answering requests that pin none.")
    versions: list[str] = Field(description="The versions loaded, oldest first.")


class UnloadedJSON(BaseModel):
    name: str
    unloaded: list[str] = Field(description="The versions that were loaded.")


class IndexEntry(BaseModel):
    name: str
    version: str | None = None
    state: str = Field(description="READY or UNAVAILABLE.")
    reason: str = ""


class IndexRequest(BaseModel):
    ready: bool = Field(default=False, description="List only the models that are ready.")


def _managed(state: ServiceState, *, changing: bool) -> ModelRepository:
    if changing and state.settings.model_control == "none":
        raise ManagementOff(
            "model management is off on this server: start it with VAE_MODEL_CONTROL=explicit "
            "(or poll) to load and unload models at runtime"
        )
    if not state.ready or state.repository is None:
        raise NotReady("models are still loading; retry when GET /readyz answers 200")
    return state.repository


def _model(repository: ModelRepository, name: str) -> str:
    """The repository's name for `name`: itself, or the model of a v2 name `<model>-<op>`."""
    if name not in repository.folders:
        model, _, op = name.rpartition("-")
        if op in OPS and model in repository.folders:
            return model
    return name


async def _load(state: ServiceState, name: str) -> LoadedJSON:
    repository = _managed(state, changing=True)
    deployed = await repository.load(_model(repository, name))
    model = deployed.entry.name
    return LoadedJSON(name=model, version=deployed.version, versions=repository.versions(model))


async def _unload(state: ServiceState, name: str) -> UnloadedJSON:
    repository = _managed(state, changing=True)
    model = _model(repository, name)
    return UnloadedJSON(name=model, unloaded=await repository.unload(model))


MANAGED = error_responses(400, 403, 404, 503)
# Under /v2 errors are the protocol's {"error": ...}.
V2_MANAGED = v2_errors(400, 403, 404, 422, 503)


@router.post("/models/{name}/load", response_model=LoadedJSON, responses=MANAGED)
async def load(state: StateDep, name: ModelName) -> LoadedJSON:
    """Load the model's checkpoint folder again: its new revision answers once loaded and
    warmed up (the old one until then); a load that fails keeps the old one and says why."""
    return await _load(state, name)


@router.post("/models/{name}/unload", response_model=UnloadedJSON, responses=MANAGED)
async def unload(state: StateDep, name: ModelName) -> UnloadedJSON:
    """Stop serving the model: its requests are then 404s; those in flight are answered."""
    return await _unload(state, name)


@router.post("/v2/repository/index", response_model=list[IndexEntry], responses=V2_MANAGED)
async def repository_index(state: StateDep, body: IndexRequest | None = None) -> list[IndexEntry]:
    """Every model of the repository (the configured checkpoint folders) and its state."""
    repository = _managed(state, changing=False)
    rows = [IndexEntry(**vars(row)) for row in repository.index()]
    return [row for row in rows if row.state == "READY"] if body and body.ready else rows


@router.post("/v2/repository/models/{name}/load", responses=V2_MANAGED)
async def repository_load(state: StateDep, name: ModelName) -> dict[str, Any]:
    """Triton's load: as POST /models/{name}/load."""
    await _load(state, name)
    return {}


@router.post("/v2/repository/models/{name}/unload", responses=V2_MANAGED)
async def repository_unload(state: StateDep, name: ModelName) -> dict[str, Any]:
    """Triton's unload: as POST /models/{name}/unload."""
    await _unload(state, name)
    return {}
