"""Prometheus metrics exported by the service: one registry, names fixed by the API contract."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

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
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.request_duration = Histogram(
            "vae_request_duration_seconds",
            "HTTP request latency by route template, method and status.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests_in_flight = Gauge(
            "vae_requests_in_flight", "HTTP requests being handled now.", registry=self.registry
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
        )
        self.gpu_memory = Gauge(
            "vae_gpu_memory_allocated_bytes",
            "GPU memory held by tensors, by device (absent on CPU-only hosts).",
            ["device"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
