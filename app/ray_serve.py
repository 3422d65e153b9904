"""The service on Ray Serve: the same FastAPI app behind Serve's ingress, one copy per replica.

`serve run deploy/ray/serve.yaml` (see deploy/ray/) deploys `deployment` below. Each replica is
a Ray actor of its own: while Serve constructs it, it reads its settings from its VAE_*
environment, loads the checkpoints onto its own device (the GPU Ray assigned to it with
`ray_actor_options.num_gpus`, under VAE_DEVICE=auto) and builds the app around them; Serve
then runs the app's lifespan (warm-up, the micro-batchers) in the replica, routes traffic to
it once that has finished, and drains it (the lifespan's shutdown) when it stops it.
`check_health` reports healthy only while the models are loaded and warmed up.

Every response names the replica that answered in `X-Replica`. Each replica keeps its own
Prometheus metrics (app.metrics); `RayMetricsExport` copies them into Ray's metrics every few
seconds, which Ray's per-node metrics agent exports to Prometheus with the replica's name in the
`replica` label (`ray_vae_request_duration_seconds_bucket{replica=...}`).
"""

from __future__ import annotations

import logging
import threading
import time

try:
    from ray import serve
    from ray.serve.metrics import Gauge
except ImportError as exc:  # an optional dependency: the `ray` extra
    raise ImportError(
        "app.ray_serve needs Ray Serve, which is not installed: pip install -e '.[ray]'"
    ) from exc
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.http.state import ServiceState
from app.main import create_app
from app.service.registry import Registry
from app.settings import Settings, SettingsError

logger = logging.getLogger("app.ray_serve")

REPLICA_HEADER = "X-Replica"
# Ray's metrics agent exports application metrics under this prefix.
RAY_METRIC_PREFIX = "ray_"
# Which of the replica's own series are copied into Ray's metrics (all of the service's).
EXPORTED_PREFIX = "vae_"
EXPORT_INTERVAL_S = 2.0


def replica_name() -> str:
    """This replica as Serve names it, `<app>#<deployment>#<id>`: its actor is
    `SERVE_REPLICA::<that>` in Ray's `serve` namespace, and `<id>` is the `replica` label of its
    metrics."""
    context = serve.get_replica_context()
    return f"{context.app_name}#{context.deployment}#{context.replica_tag}"


class ReplicaHeaderMiddleware:
    """Adds `X-Replica: <replica>` to every response, so load spreading can be seen."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class RayMetricsExport:
    """The replica's Prometheus registry, copied into Ray's metrics: each sample of a `vae_*`
    family (a histogram's `_bucket`, `_sum` and `_count` included) becomes a Ray gauge of the
    same name and labels, which Serve tags with the deployment, the replica and the app."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._gauges: dict[str, Gauge] = {}

    def export(self) -> None:
        for family in self.registry.collect():
            if not family.name.startswith(EXPORTED_PREFIX):
                continue
            for sample in family.samples:
                if sample.name.endswith("_created"):  # creation times: not a measurement
                    continue
                gauge = self._gauges.get(sample.name)
                if gauge is None:
                    gauge = Gauge(
                        sample.name,
                        description=family.documentation,
                        # Ray annotates tag_keys as tuple[str], meaning a tuple of names.
                        tag_keys=tuple(sorted(sample.labels)),  # type: ignore[arg-type]
                    )
                    self._gauges[sample.name] = gauge
                gauge.set(sample.value, tags=dict(sample.labels))

    def run(self, interval_s: float = EXPORT_INTERVAL_S) -> None:
        """Export every `interval_s`, for as long as the replica's process lives (a daemon
        thread: no event loop of the replica's is held up by it)."""
        while True:
            try:
                self.export()
            except Exception:  # a failed export must not stop the next one
                logger.exception("exporting the replica's metrics to Ray failed")
            time.sleep(interval_s)


def build_app() -> FastAPI:
    """The replica's app; Serve evaluates this on each replica while it constructs it (after
    VaeService.__init__): settings from the replica's VAE_* environment, the checkpoints loaded
    onto the replica's device, the X-Replica header, and the export of its metrics to Ray."""
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"VAE_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise SettingsError(
            f"bad VAE_* settings in the Serve config's runtime_env: {problems}"
        ) from None
    logging.getLogger("app").setLevel(settings.log_level.upper())
    registry = Registry.load(settings)
    app = create_app(settings, registry)
    replica = replica_name()
    app.add_middleware(ReplicaHeaderMiddleware, replica=replica)
    export = RayMetricsExport(app.state.service.metrics.registry)
    threading.Thread(target=export.run, name="ray-metrics-export", daemon=True).start()
    logger.info("replica %s: loaded %s", replica, ", ".join(registry.models))
    return app


class VaeReplica:
    """One replica of the service: Serve's FastAPI ingress around build_app()'s app."""

    def check_health(self) -> None:
        """Serve's health check: healthy once the models are loaded and warmed up (the app's
        lifespan has run) and until the replica starts to shut down."""
        # `app` is the ingress wrapper's: the app build_app() returned for this replica.
        state: ServiceState = self.app.state.service  # type: ignore[attr-defined]
        if not state.ready or state.registry is None:
            raise RuntimeError("the replica's models are not loaded and warmed up")


# Serve's decorators, called rather than stacked on the class so that type checkers see the
# Deployment they return.
VaeService = serve.deployment(
    name="VaeService",
    # The defaults of `serve run app.ray_serve:deployment`; deploy/ray/serve.yaml sets each
    # of them (and autoscaling) and says why.
    max_ongoing_requests=32,
    graceful_shutdown_timeout_s=40,
    health_check_period_s=5,
    health_check_timeout_s=10,
    ray_actor_options={"num_cpus": 1},
)(serve.ingress(build_app)(VaeReplica))

# The application `serve run` deploys (import path app.ray_serve:deployment).
deployment = VaeService.bind()
