"""What the running app holds: settings, metrics, and the models once they are loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Query, Request

from app.errors import NotReady
from app.http.v2_models import V2Model
from app.metrics import Metrics
from app.service.batching import MicroBatcher
from app.service.predict import ModelHandle
from app.service.registry import Registry
from app.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    registry: Registry | None = None
    batchers: dict[str, MicroBatcher] = field(default_factory=dict)
    v2_models: dict[str, V2Model] = field(default_factory=dict)  # by name, built at load
    ready: bool = False
    tracer: Tracer | None = None  # None: tracing off (app.tracing)

    def observe_gpu_memory(self) -> None:
        """vae_gpu_memory_allocated_bytes of each GPU a model is on, now (before a scrape)."""
        if self.registry is not None:
            for device, allocated in self.registry.gpu_memory_allocated().items():
                self.metrics.gpu_memory.labels(device).set(allocated)

    def handle(self, model: str | None) -> ModelHandle:
        if not self.ready or self.registry is None:
            raise NotReady("models are still loading; retry when GET /readyz answers 200")
        entry = self.registry.get(model)
        return ModelHandle(entry, self.batchers[entry.name], self.metrics)


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


async def get_model(
    state: Annotated[ServiceState, Depends(get_state)], model: ModelQuery = None
) -> ModelHandle:
    return state.handle(model)


def service(request: Request) -> ServiceState:
    """The app's state, for the hottest routes, which take it without FastAPI's dependency
    solving (two sub-dependencies cost /sample ~14% of its server time under load)."""
    state: ServiceState = request.app.state.service
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]
ModelDep = Annotated[ModelHandle, Depends(get_model)]
