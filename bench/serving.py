"""Serving benchmarks: the endpoint cases, the floor, the naive baseline, workers, startup, soak.

Every server is a real `python -m app` subprocess on loopback. Cases that are compared with
each other run interleaved, round by round, so a burst of other work on a shared machine
lands on all of them rather than on one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.loadgen import Connection, LoadResult, Request, closed_loop, constant_rate, multipart
from bench.server import Server, ServerError
from models import VAE

MB = 1024 * 1024
SAMPLE_CONCURRENCY = (1, 8, 32, 64)
NAIVE_CONCURRENCY = (1, 32, 64)
# The constant-rate case offers this share of the closed-loop /sample throughput at c=32.
RATE_SHARE = 0.5
# The shared server: default settings, plus the floor route.
DEFAULT_ENV = {"VAE_ENABLE_BENCH_ROUTES": "true"}
# The in-process decoder timing: at least this many calls and this many seconds per size.
MODEL_COST_MIN_REPEATS, MODEL_COST_SECONDS = 3, 0.3
# Runs bounded by a request count still stop after this long.
COUNTED_RUN_LIMIT_S = 180.0
# Batching settings compared with the defaults (64 images, no extra wait).
BATCHING_CONFIGS: dict[str, dict[str, str]] = {
    "defaults": {},  # the shared server
    "max_batch_16": {"VAE_MAX_BATCH_IMAGES": "16"},
    "max_batch_256": {"VAE_MAX_BATCH_IMAGES": "256"},
    "wait_1ms": {"VAE_MAX_BATCH_WAIT_MS": "1"},
}


@dataclass(frozen=True)
class Scale:
    """How long and how much: the full run, or a quick one for the smoke test."""

    duration_s: float  # measured seconds per case per round
    warmup_s: float  # unmeasured seconds before each case per round
    rounds: int  # interleaved rounds per case, pooled
    max_requests: int  # cap per case per round
    rss_requests: int  # requests before the "RSS after N requests" reading
    soak_warmup_requests: int  # mixed requests before the soak's RSS baseline
    soak_requests: int  # mixed requests of the soak
    train_epochs: int  # measured epochs per training loop (after one warm-up epoch)
    train_images: int | None  # training images per epoch; None = the whole split
    batching_configs: tuple[str, ...]  # names in BATCHING_CONFIGS
    # (uvicorn workers, torch threads per worker); None keeps torch's default (one per core)
    worker_configs: tuple[tuple[int, int | None], ...]
    model_batch_sizes: tuple[int, ...]  # batch sizes of the in-process decoder cost


FULL = Scale(
    duration_s=3.0,
    warmup_s=0.5,
    rounds=2,
    max_requests=100_000,
    rss_requests=10_000,
    soak_warmup_requests=2_000,
    soak_requests=20_000,
    train_epochs=3,
    train_images=None,
    batching_configs=("defaults", "max_batch_16", "max_batch_256", "wait_1ms"),
    worker_configs=((1, None), (1, 1), (2, 1), (2, 2)),
    model_batch_sizes=(1, 8, 16, 32, 64, 128, 256),
)
QUICK = Scale(
    duration_s=0.4,
    warmup_s=0.1,
    rounds=1,
    max_requests=200,
    rss_requests=200,
    soak_warmup_requests=50,
    soak_requests=300,
    train_epochs=1,
    train_images=256,
    batching_configs=("defaults", "wait_1ms"),
    worker_configs=((1, None), (2, 1)),
    model_batch_sizes=(1, 8),
)


@dataclass(frozen=True)
class Case:
    name: str
    endpoint: str  # what the table shows
    requests: list[Request]
    concurrency: int


def digit_pngs(count: int) -> list[bytes]:
    """`count` real held-out MNIST digits as 28x28 PNGs (what a client would upload)."""
    from app.service.imaging import encode_png
    from training.data import load_dataset, to_float

    test = load_dataset("mnist-5k").test
    return [encode_png(image) for image in to_float(test.images[:count])]


def peer_inputs(checkpoint: Path) -> tuple[np.ndarray, np.ndarray]:
    """What the peers section sends: a held-out digit (28, 28) in [0, 1], and the posterior
    mean (L,) of the same digit (a 7 drawn from the test split) under its label."""
    from training.data import load_dataset, to_float

    test = load_dataset("mnist-5k").test
    index = int((test.labels == 7).nonzero()[0, 0])
    image = to_float(test.images[index : index + 1])  # (1, 1, 28, 28)
    model = VAE.from_pretrained(checkpoint).eval()
    with torch.inference_mode():
        labels = None if model.config.num_classes is None else torch.tensor([7])
        latent = model.encode(image, labels).mean[0]
    return image[0, 0].numpy(), latent.numpy()


def build_cases(pngs: list[bytes]) -> dict[str, Case]:
    """Every serving case by name."""
    floor = Request("POST", "/bench/floor")
    sample = Request("POST", "/sample?n=1&digit=7")
    one_body, one_type = multipart(pngs[:1])
    many_body, many_type = multipart(pngs[:16])
    cases = [
        *(Case(f"floor_c{c}", "POST /bench/floor", [floor], c) for c in SAMPLE_CONCURRENCY),
        *(
            Case(f"sample_c{c}", "POST /sample?n=1&digit=7", [sample], c)
            for c in SAMPLE_CONCURRENCY
        ),
        Case("sample_n64_c8", "POST /sample?n=64", [Request("POST", "/sample?n=64", images=64)], 8),
        Case(
            "anomaly_1_c8",
            "POST /anomaly-score, 1 PNG",
            [Request("POST", "/anomaly-score", one_body, one_type)],
            8,
        ),
        Case(
            "upload_floor_1_c8",
            "POST /bench/upload-floor, 1 PNG",
            [Request("POST", "/bench/upload-floor", one_body, one_type)],
            8,
        ),
        Case(
            "similar_1_c8",
            "POST /similar?k=8, 1 PNG",
            [Request("POST", "/similar?k=8", one_body, one_type)],
            8,
        ),
        Case(
            "anomaly_16_c8",
            "POST /anomaly-score, 16 PNGs",
            [Request("POST", "/anomaly-score", many_body, many_type, images=16)],
            8,
        ),
    ]
    return {case.name: case for case in cases}


def _probe(server: Server, case: Case) -> str | None:
    """None when one request of `case` succeeds; why the case is skipped when the service or
    the checkpoint lacks the feature (404: an older revision, 400: no latent index); a
    ServerError for any other answer, a 500 above all: a broken endpoint is not a skip."""
    request = case.requests[0]
    status = asyncio.run(_send_once(server.port, request))
    if status == 200:
        return None
    if status == 404:
        return "absent (404): this version of the service has no such endpoint"
    if status == 400:
        return "answered 400: the checkpoint has no latent index"
    raise ServerError(
        f"{request.method} {request.target} answered {status} to the probe of {case.name}: the "
        f"endpoint is broken, not missing; see the server log:\n{server.log_tail()}"
    )


async def _send_once(port: int, request: Request) -> int:
    connection = Connection(port)
    try:
        return await connection.send(request.encode(port))
    finally:
        await connection.close()


def soak_mix(pngs: list[bytes]) -> list[Request]:
    """The mixed traffic of the soak: generation, analysis and operations endpoints."""
    one_body, one_type = multipart(pngs[:1])
    many_body, many_type = multipart(pngs[:16])
    return [
        Request("POST", "/sample?n=1&digit=7"),
        Request("POST", "/sample?n=8", images=8, accept="application/json"),
        Request("POST", "/anomaly-score", one_body, one_type),
        Request("POST", "/reconstruct", one_body, one_type),
        Request("POST", "/encode", one_body, one_type),
        Request("POST", "/anomaly-score?heatmap=true", one_body, one_type),
        Request("POST", "/anomaly-score", many_body, many_type, images=16),
        Request("POST", "/variations?n=4", one_body, one_type, images=4),
        Request("GET", "/models", images=0),
        Request("GET", "/healthz", images=0),
    ]


def merge(results: list[LoadResult]) -> LoadResult:
    """Rounds of one case pooled: seconds and counts add up, latencies are concatenated."""
    first = results[0]
    merged = LoadResult(first.mode, first.concurrency, first.rate, 0.0)
    merged.server_cpu_s = 0.0
    for result in results:
        merged.seconds += result.seconds
        merged.latencies += result.latencies
        merged.statuses.update(result.statuses)
        merged.failures += result.failures
        merged.images += result.images
        merged.client_cpu_s += result.client_cpu_s
        merged.server_cpu_s += result.server_cpu_s or 0.0
    return merged


def run_closed(
    server: Server, case: Case, *, duration_s: float, max_requests: int, warmup_s: float = 0.0
) -> LoadResult:
    """One closed-loop run of `case`, with the server's CPU time over it."""
    cpu_before = server.cpu_seconds()
    result = asyncio.run(
        closed_loop(
            server.port,
            case.requests,
            concurrency=case.concurrency,
            duration_s=duration_s,
            max_requests=max_requests,
            warmup_s=warmup_s,
        )
    )
    result.server_cpu_s = server.cpu_seconds() - cpu_before
    return result


def interleaved(
    plan: list[tuple[Server, Case, str]], scale: Scale, log: Callable[[str], None]
) -> dict[str, LoadResult]:
    """Run each (server, case) of `plan` once per round, in plan order; pool the rounds."""
    rounds: dict[str, list[LoadResult]] = {key: [] for _, _, key in plan}
    for index in range(scale.rounds):
        for server, case, key in plan:
            rounds[key].append(
                run_closed(
                    server,
                    case,
                    duration_s=scale.duration_s,
                    max_requests=scale.max_requests,
                    warmup_s=scale.warmup_s,
                )
            )
            summary = rounds[key][-1].summary()
            log(
                f"  round {index + 1}/{scale.rounds} {key:<28} {summary['req_s']:8.1f} req/s  "
                f"p50 {summary['p50_ms']:6.2f} ms  p99 {summary['p99_ms']:6.2f} ms  "
                f"errors {summary['errors']}"
            )
    return {key: merge(results) for key, results in rounds.items()}


def _row(case: Case, result: LoadResult, **extra: Any) -> dict[str, Any]:
    return {"endpoint": case.endpoint, **result.summary(), **extra}


class Pool:
    """The servers of one run, keyed by their settings. The server with default settings (and
    the floor route) is started once and shared by the sections; the others live for their
    section. Servers asked for together start at once, so their startup times are not the
    startup measurement (that server starts alone, in startup_and_soak)."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.startups: dict[str, float] = {}
        self._default: Server | None = None

    @contextmanager
    def servers(self, specs: dict[str, dict[str, str]]) -> Iterator[dict[str, Server]]:
        """One server per spec (VAE_* settings); {} is the shared server with the defaults."""
        started = {name: Server(self.checkpoint, env) for name, env in specs.items() if env}
        launching = list(started.values())
        if self._default is None and any(not env for env in specs.values()):
            self._default = Server(self.checkpoint, DEFAULT_ENV)
            launching.append(self._default)
        try:
            for server in launching:
                server.launch()
            for server in launching:
                server.wait_ready()
            chosen: dict[str, Server] = {}
            for name, env in specs.items():
                pick = started[name] if env else self._default
                assert pick is not None
                chosen[name] = pick
                self.startups[name] = pick.startup_s
            yield chosen
        finally:
            # All are asked to stop before any is waited for: they shut down at once.
            for server in started.values():
                server.terminate()
            for server in started.values():
                server.stop()

    def close(self) -> None:
        if self._default is not None:
            self._default.stop()
            self._default = None


def serving(pool: Pool, scale: Scale, log: Callable[[str], None]) -> dict[str, Any]:
    """The endpoint cases and the floor on the default settings, and the naive baseline
    (VAE_MAX_BATCH_IMAGES=1: the batcher never coalesces, one forward pass per request)."""
    cases = build_cases(digit_pngs(16))
    specs = {"batched": {}, "naive": {"VAE_MAX_BATCH_IMAGES": "1"}}
    with pool.servers(specs) as started:
        batched, plain = started["batched"], started["naive"]
        plan: list[tuple[Server, Case, str]] = []
        for concurrency in SAMPLE_CONCURRENCY:
            plan.append((batched, cases[f"floor_c{concurrency}"], f"floor_c{concurrency}"))
            plan.append((batched, cases[f"sample_c{concurrency}"], f"sample_c{concurrency}"))
            if concurrency in NAIVE_CONCURRENCY:
                plan.append((plain, cases[f"sample_c{concurrency}"], f"naive_c{concurrency}"))
        for name in ("sample_n64_c8", "anomaly_1_c8", "upload_floor_1_c8", "anomaly_16_c8"):
            plan.append((batched, cases[name], name))
        similar_skipped = _probe(batched, cases["similar_1_c8"])
        if similar_skipped is None:
            plan.append((batched, cases["similar_1_c8"], "similar_1_c8"))
        else:
            log(f"  /similar skipped: {similar_skipped}")
        log(f"serving: {len(plan)} cases x {scale.rounds} rounds of {scale.duration_s:g} s")
        results = interleaved(plan, scale, log)
        rate = max(1.0, RATE_SHARE * results["sample_c32"].summary()["req_s"])
        log(f"  constant rate {rate:.0f} req/s on /sample")
        cpu_before = batched.cpu_seconds()
        paced = asyncio.run(
            constant_rate(
                batched.port,
                cases["sample_c32"].requests,
                rate=rate,
                duration_s=scale.duration_s * scale.rounds,
                max_requests=scale.max_requests,
            )
        )
        paced.server_cpu_s = batched.cpu_seconds() - cpu_before
    out: dict[str, Any] = {"cases": {}, "naive": {}}
    if similar_skipped is not None:
        out["skipped"] = {"similar_1_c8": similar_skipped}
    for key, result in results.items():
        if key.startswith("naive_"):
            concurrency = int(key.removeprefix("naive_c"))
            out["naive"][f"sample_c{concurrency}"] = _row(
                cases[f"sample_c{concurrency}"], result, server="VAE_MAX_BATCH_IMAGES=1"
            )
        else:
            out["cases"][key] = _row(cases[key], result, server="defaults")
    out["cases"]["sample_rate"] = _row(
        cases["sample_c32"],
        paced,
        server="defaults",
        note=f"open loop at {RATE_SHARE:g} x the c=32 closed-loop throughput",
    )
    return out


def workers(pool: Pool, scale: Scale, log: Callable[[str], None]) -> dict[str, Any]:
    """uvicorn workers x torch threads per worker, on /sample and the upload path."""
    cases = build_cases(digit_pngs(16))
    chosen = ("sample_c32", "sample_n64_c8", "anomaly_16_c8")
    specs = {}
    for count, threads in scale.worker_configs:
        env = {"VAE_WORKERS": str(count)}
        if threads is not None:
            env["VAE_TORCH_THREADS"] = str(threads)
        specs[config_label(count, threads)] = env
    with pool.servers(specs) as started:
        plan = [
            (started[label], cases[name], f"{label}/{name}") for label in specs for name in chosen
        ]
        log(f"workers: {len(specs)} configurations x {len(chosen)} cases")
        results = interleaved(plan, scale, log)
    out: dict[str, Any] = {"configs": {}}
    for count, threads in scale.worker_configs:
        label = config_label(count, threads)
        out["configs"][label] = {
            "workers": count,
            "torch_threads": threads,
            "cases": {name: _row(cases[name], results[f"{label}/{name}"]) for name in chosen},
        }
    return out


def batching(pool: Pool, scale: Scale, log: Callable[[str], None]) -> dict[str, Any]:
    """The batching settings side by side: the image cap and the extra wait, against the
    defaults; plus the model's own cost per image by batch size (no HTTP)."""
    cases = build_cases(digit_pngs(16))
    chosen = ("sample_c1", "sample_c32", "sample_n64_c8")
    configs = scale.batching_configs
    with pool.servers({label: BATCHING_CONFIGS[label] for label in configs}) as started:
        plan = [
            (started[label], cases[name], f"{label}/{name}") for label in configs for name in chosen
        ]
        log(f"batching: {len(configs)} configurations x {len(chosen)} cases")
        results = interleaved(plan, scale, log)
    rows = {
        label: {
            "env": BATCHING_CONFIGS[label],
            "cases": {name: _row(cases[name], results[f"{label}/{name}"]) for name in chosen},
        }
        for label in configs
    }
    return {"configs": rows, "model_cost": model_cost(pool.checkpoint, scale.model_batch_sizes)}


def model_cost(checkpoint: Path, sizes: tuple[int, ...]) -> dict[str, Any]:
    """Microseconds per image of one decode (what /sample runs) by batch size and torch
    threads, in this process: where batching stops paying on this CPU."""
    model = VAE.from_pretrained(checkpoint).eval()
    before = torch.get_num_threads()
    out: dict[str, Any] = {}
    try:
        for threads in sorted({1, before}):
            torch.set_num_threads(threads)
            row = {}
            for size in sizes:
                z = torch.randn(size, model.config.latent_dim)
                labels = _one_hot_sevens(size, model.config.num_classes)
                with torch.inference_mode():
                    model.decode(z, labels)  # warm-up
                    repeats, started = 0, time.perf_counter()
                    while repeats < MODEL_COST_MIN_REPEATS or (
                        time.perf_counter() - started < MODEL_COST_SECONDS
                    ):
                        model.decode(z, labels)
                        repeats += 1
                    elapsed = time.perf_counter() - started
                row[str(size)] = elapsed / repeats / size * 1e6
            out[f"threads_{threads}"] = row
    finally:
        torch.set_num_threads(before)
    return {"us_per_image": out}


def _one_hot_sevens(size: int, num_classes: int | None) -> torch.Tensor | None:
    if num_classes is None:
        return None
    return F.one_hot(torch.full((size,), 7), num_classes).float()


def config_label(workers: int, threads: int | None) -> str:
    return f"w{workers}_t{'default' if threads is None else threads}"


def startup_and_soak(checkpoint: Path, scale: Scale, log: Callable[[str], None]) -> dict[str, Any]:
    """Seconds to /readyz 200 and RSS of a fresh server, after N requests, and over a soak."""
    pngs = digit_pngs(16)
    sample = build_cases(pngs)["sample_c32"]
    with Server(checkpoint) as server:
        startup_s = server.startup_s
        rss_ready = server.rss_bytes()
        log(f"startup: ready in {startup_s:.2f} s, RSS {rss_ready / MB:.0f} MB")
        warm = run_closed(
            server, sample, duration_s=COUNTED_RUN_LIMIT_S, max_requests=scale.rss_requests
        )
        rss_warm = server.rss_bytes()
        log(
            f"  after {warm.requests} /sample requests: RSS {rss_warm / MB:.0f} MB "
            f"({warm.summary()['req_s']:.0f} req/s)"
        )
        mix = Case("soak", "mixed endpoints", soak_mix(pngs), 16)
        # The mix's first heavy batches raise the allocator's high-water mark once (~40 MB
        # with the default 64-image batches); a warm-up of the same mix takes that step before
        # the soak's baseline, so that growth over the soak means memory kept per request.
        started = time.perf_counter()
        mix_warm = run_closed(
            server, mix, duration_s=COUNTED_RUN_LIMIT_S, max_requests=scale.soak_warmup_requests
        )
        rss_before = server.rss_bytes()
        half = scale.soak_requests // 2
        first = run_closed(server, mix, duration_s=COUNTED_RUN_LIMIT_S, max_requests=half)
        rss_mid = server.rss_bytes()
        second = run_closed(
            server, mix, duration_s=COUNTED_RUN_LIMIT_S, max_requests=scale.soak_requests - half
        )
        rss_after = server.rss_bytes()
        soak = merge([first, second])
        log(
            f"  soak: {mix_warm.requests} + {soak.requests} mixed requests in "
            f"{time.perf_counter() - started:.1f} s, RSS {rss_before / MB:.0f} -> "
            f"{rss_mid / MB:.0f} -> {rss_after / MB:.0f} MB, 5xx "
            f"{mix_warm.server_errors + soak.server_errors}"
        )
        exit_status = server.stop()
    return {
        "startup_s": startup_s,
        "rss_ready_mb": rss_ready / MB,
        "requests_before_rss": warm.requests,
        "rss_after_requests_mb": rss_warm / MB,
        "warm_errors": warm.errors,
        "soak": {
            **soak.summary(),
            "endpoints": [f"{r.method} {r.target}" for r in mix.requests],
            "warmup_requests": mix_warm.requests,
            "warmup_server_errors": mix_warm.server_errors,
            "rss_before_warmup_mb": rss_warm / MB,
            "rss_before_mb": rss_before / MB,
            "rss_mid_mb": rss_mid / MB,
            "rss_after_mb": rss_after / MB,
            "rss_growth_mb": (rss_after - rss_before) / MB,
            "rss_growth_second_half_mb": (rss_after - rss_mid) / MB,
            "rss_growth_with_warmup_mb": (rss_after - rss_warm) / MB,
        },
        "exit_status_on_sigterm": exit_status,
    }
