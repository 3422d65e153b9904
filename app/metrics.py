"""Prometheus metrics exported by the service: one registry, names fixed by the API contract.

With several worker processes (`VAE_WORKERS` > 1) every worker writes its samples to files in
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, set up by `python -m app`
before the workers start) and `/metrics`, whichever worker answers it, adds up all of them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from functools import partial
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# 0.5 ms to 10 s: a cached PNG on loopback is sub-millisecond, a cold GPU batch can take seconds.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# The shipped anomaly score is a Mahalanobis distance: normal inputs sit around 1-3.
ANOMALY_SCORE_BUCKETS = (0.5, 1, 1.5, 2, 2.5, 3, 4, 5, 7.5, 10, 15, 25, 50, 100, 250, 1000)


class Metrics:
    """All metrics of one app instance, on a registry of its own so tests can build many apps."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir()
        if self.multiprocess_dir is None:
            ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.request_duration = Histogram(
            "vae_request_duration_seconds",
            "HTTP request latency by route template, method and status.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Gauges say how several workers' values combine: live ones summed (a dead worker's
        # requests are not in flight), model_info the same 1 in each.
        self.requests_in_flight = Gauge(
            "vae_requests_in_flight",
            "HTTP requests being handled now.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.requests_rejected = Counter(
            "vae_requests_rejected_total",
            "Requests refused before inference, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.inference_duration = Histogram(
            "vae_inference_duration_seconds",
            "Time of each forward pass actually run, by model and op.",
            ["model", "op"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "vae_batch_size",
            "Images in each forward pass actually run, by model and op.",
            ["model", "op"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "vae_queue_depth",
            "Images waiting for a forward pass, by model.",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.key_requests = Counter(
            "vae_key_requests_total",
            "Requests that came with a valid API key, by the key's id (VAE_API_KEYS).",
            ["key"],
            registry=self.registry,
        )
        self.anomaly_score = Histogram(
            "vae_anomaly_score",
            "Anomaly scores of scored inputs, by model (watch for drift).",
            ["model"],
            buckets=ANOMALY_SCORE_BUCKETS,
            registry=self.registry,
        )
        self.model_info = Gauge(
            "vae_model_info",
            "Loaded models: 1 per model with its architecture and device.",
            ["model", "architecture", "device"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.gpu_memory = Gauge(
            "vae_gpu_memory_allocated_bytes",
            "GPU memory held by tensors, by device (absent on CPU-only hosts).",
            ["device"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )

    def render(self) -> bytes:
        """The registry in Prometheus text format; in multiprocess mode every worker's."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined, path=str(self.multiprocess_dir))
        combined.register(WorkersProcessCollector(self.multiprocess_dir))
        PlatformCollector(registry=combined)
        return generate_latest(combined)

    def close(self) -> None:
        """This worker is stopping: its live gauges leave the sums."""
        if self.multiprocess_dir is not None:
            multiprocess.mark_process_dead(os.getpid(), str(self.multiprocess_dir))


def multiprocess_dir() -> Path | None:
    """PROMETHEUS_MULTIPROC_DIR when set (multiprocess mode), else None."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


# prometheus_client names each worker's files <kind>[_<mode>]_<pid>.db.
_WORKER_FILE = re.compile(r"_(\d+)\.db$")


class WorkersProcessCollector(Collector):
    """The process metrics of all live workers added up (CPU seconds, memory, open files; the
    earliest start time, the lowest file limit), so the dashboard's memory and CPU stay the
    whole service's."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _pids(self) -> set[int]:
        pids = set()
        for path in self.directory.glob("*.db"):
            match = _WORKER_FILE.search(path.name)
            if match and Path(f"/proc/{match.group(1)}").exists():
                pids.add(int(match.group(1)))
        return pids or {os.getpid()}

    def collect(self) -> Iterable[Metric]:
        totals: dict[str, Metric] = {}
        for pid in sorted(self._pids()):
            collector = ProcessCollector(pid=partial(int, pid), registry=None)
            for metric in collector.collect():
                kept = totals.setdefault(metric.name, metric)
                if kept is metric:
                    continue
                combine = (
                    min
                    if metric.name in ("process_start_time_seconds", "process_max_fds")
                    else lambda a, b: a + b
                )
                kept.samples = [
                    mine._replace(value=combine(mine.value, theirs.value))
                    for mine, theirs in zip(kept.samples, metric.samples, strict=True)
                ]
        return list(totals.values())
