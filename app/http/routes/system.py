"""Operations endpoints: model cards, liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.errors import NotReady
from app.http.routes import error_responses
from app.http.schemas import ModelsJSON
from app.http.state import StateDep

router = APIRouter(tags=["operations"])


@router.get("/models", response_model=ModelsJSON, responses=error_responses(503))
async def list_models(state: StateDep) -> ModelsJSON:
    """The loaded models: architecture, device, dataset, metrics, anomaly calibration."""
    if not state.ready or state.registry is None:
        raise NotReady("models are still loading; retry when GET /readyz answers 200")
    registry, repository = state.registry, state.repository
    assert repository is not None  # ready
    cards = [
        {**m.describe(), "versions": repository.versions(m.name)} for m in registry.models.values()
    ]
    return ModelsJSON(default=registry.default, models=cards)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """200 while the process is alive."""
    return {"status": "alive"}


@router.get("/readyz", responses=error_responses(503))
async def readyz(state: StateDep) -> JSONResponse:
    """200 once every configured model is loaded and warmed up; 503 before."""
    if not state.ready or state.registry is None:
        raise NotReady("models are loading")
    return JSONResponse({"status": "ready", "models": list(state.registry.models)})


@router.get("/metrics", response_class=Response)
def metrics(state: StateDep) -> Response:
    """Prometheus text format."""
    state.observe_gpu_memory()
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
