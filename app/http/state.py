"""What the running app holds: settings, metrics, and the models once they are loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Query, Request

from app.errors import NotReady
from app.http.request_context import record_version
from app.http.v2_models import V2Model, Versioned
from app.metrics import Metrics
from app.service.predict import ModelHandle
from app.service.registry import Registry
from app.service.repository import ModelRepository
from app.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    repository: ModelRepository | None = None
    v2_models: dict[str, V2Model] = field(default_factory=dict)  # by name, the latest versions
    v2_versions: Versioned = field(default_factory=dict)  # every loaded version's
    ready: bool = False
    tracer: Tracer | None = None  # None: tracing off (app.tracing)

    @property
    def registry(self) -> Registry | None:
        """The latest loaded version of each model, by name."""
        return None if self.repository is None else self.repository.registry

    def observe_gpu_memory(self) -> None:
        """vae_gpu_memory_allocated_bytes of each GPU a model is on, now (before a scrape)."""
        if self.registry is not None:
            for device, allocated in self.registry.gpu_memory_allocated().items():
                self.metrics.gpu_memory.labels(device).set(allocated)

    def handle(self, model: str | None, version: str | None = None) -> ModelHandle:
        """The model a request names (the default when None), at the version it pins (the
        latest when None); the version that answers is recorded for the response header."""
        if not self.ready or self.repository is None:
            raise NotReady("models are still loading; retry when GET /readyz answers 200")
        deployed = self.repository.deployed(model, version)
        record_version(deployed.entry.name, deployed.version)
        return ModelHandle(deployed.entry, deployed.batcher, self.metrics)


# Dependencies and cheap handlers are `async def`: FastAPI runs a plain `def` one in its
# threadpool, and those two hops cost ~100 us per request in-process (/sample c=32 1.21x
# faster without them: bench/results/compare-async-dependencies.md) and would leave /healthz
# waiting behind a saturated pool.
async def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


ModelQuery = Annotated[
    str | None,
    Query(description="Name of a loaded model (GET /models); default: the first configured."),
]


VersionQuery = Annotated[
    str | None,
    Query(
        description="Pin a loaded version of the model (GET /models: `versions`); default: "
        "the newest. The response's X-Model-Version header says which version answered."
    ),
]


async def get_model(
    state: Annotated[ServiceState, Depends(get_state)],
    model: ModelQuery = None,
    version: VersionQuery = None,
) -> ModelHandle:
    return state.handle(model, version)


def service(request: Request) -> ServiceState:
    """The app's state, for the hottest routes, which take it without FastAPI's dependency
    solving (two sub-dependencies cost /sample ~14% of its server time under load)."""
    state: ServiceState = request.app.state.service
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]
ModelDep = Annotated[ModelHandle, Depends(get_model)]
