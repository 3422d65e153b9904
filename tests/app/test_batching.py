"""Tests for app.service.batching: coalescing, caps, routing, failure isolation, backpressure,
deadlines.

The model is a fake `run` function of plain Python on the batcher's thread, except in the last
test, which sends concurrent requests through the real app.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from app_testing import metric, pixels
from fastapi.testclient import TestClient

from app.errors import Overloaded, ServiceError, Unavailable
from app.main import create_app
from app.metrics import Metrics
from app.service.batching import MicroBatcher, RequestTimeout
from app.settings import Settings

T = TypeVar("T")
Inputs = dict[str, torch.Tensor]
POISON = -1.0  # a fake input value that makes the fake model fail


class FakeModel:
    """Doubles its inputs; records every batch; can hold a call until released."""

    def __init__(self, hold_first: bool = False) -> None:
        self.batches: list[list[float]] = []
        self.ops: list[str] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, op: str, inputs: Inputs) -> Inputs:
        values = inputs["x"].tolist()
        self.batches.append(values)
        self.ops.append(op)
        self.started.set()
        if not self.release.wait(timeout=10):
            raise RuntimeError("the test never released the fake model")
        if POISON in values:
            raise ValueError("poisoned input")
        return {"y": inputs["x"] * 2}

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.wait, 10)


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(scenario())


def batcher(model: FakeModel, **options: Any) -> MicroBatcher:
    settings: dict[str, Any] = {
        "max_batch_images": 64,
        "max_queue_images": 1000,
        "max_wait_s": 0.0,
        "timeout_s": 10.0,
        **options,
    }
    result = MicroBatcher("fake", model, Metrics(), **settings)
    result.start()
    return result


def job(*values: float) -> Inputs:
    return {"x": torch.tensor(values, dtype=torch.float32)}


async def submit_all(micro: MicroBatcher, jobs: list[Inputs], op: str = "double") -> list[Any]:
    return await asyncio.gather(*(micro.submit(op, j) for j in jobs), return_exceptions=True)


def test_results_are_routed_to_their_callers() -> None:
    async def scenario() -> list[Any]:
        micro = batcher(FakeModel())
        try:
            return await submit_all(micro, [job(i, i + 0.5) for i in range(20)])
        finally:
            await micro.stop()

    results = run(scenario)
    for i, result in enumerate(results):
        assert result["y"].tolist() == [2 * i, 2 * i + 1]


def test_concurrent_requests_share_forward_passes() -> None:
    model = FakeModel(hold_first=True)

    async def scenario() -> list[Any]:
        micro = batcher(model)
        try:
            first = asyncio.ensure_future(micro.submit("double", job(0)))
            await model.wait_started()  # the model is busy with the first request...
            rest = asyncio.ensure_future(submit_all(micro, [job(i) for i in range(1, 11)]))
            await asyncio.sleep(0.05)  # ...while ten more arrive
            model.release.set()
            return [await first, *(await rest)]
        finally:
            await micro.stop()

    results = run(scenario)
    assert [r["y"].item() for r in results] == [2.0 * i for i in range(11)]
    assert model.batches == [[0.0], [float(i) for i in range(1, 11)]]


def test_a_batch_never_exceeds_max_batch_images() -> None:
    model = FakeModel(hold_first=True)

    async def scenario() -> list[Any]:
        micro = batcher(model, max_batch_images=7)
        try:
            first = asyncio.ensure_future(micro.submit("double", job(0)))
            await model.wait_started()
            jobs = [job(*[float(i)] * 3) for i in range(1, 9)]  # 8 jobs of 3 images
            rest = asyncio.ensure_future(submit_all(micro, jobs))
            await asyncio.sleep(0.05)
            model.release.set()
            return [await first, *(await rest)]
        finally:
            await micro.stop()

    results = run(scenario)
    assert all(not isinstance(r, Exception) for r in results)
    sizes = [len(batch) for batch in model.batches]
    assert max(sizes) <= 7
    assert sizes[1:] == [6, 6, 6, 6]  # two jobs of 3 per pass: a third would make 9
    for i, result in enumerate(results[1:], start=1):
        assert result["y"].tolist() == [2.0 * i] * 3


def test_an_oversized_job_runs_alone() -> None:
    model = FakeModel(hold_first=True)

    async def scenario() -> list[Any]:
        micro = batcher(model, max_batch_images=4)
        try:
            first = asyncio.ensure_future(micro.submit("double", job(0)))
            await model.wait_started()
            rest = asyncio.ensure_future(
                submit_all(micro, [job(1), job(*[2.0] * 10), job(3)])  # 10 > max_batch_images
            )
            await asyncio.sleep(0.05)
            model.release.set()
            return [await first, *(await rest)]
        finally:
            await micro.stop()

    results = run(scenario)
    assert results[2]["y"].tolist() == [4.0] * 10
    assert [2.0] * 10 in model.batches  # in one pass, and nothing else with it
    assert sorted(len(b) for b in model.batches) == [1, 2, 10]


def test_different_ops_are_never_mixed() -> None:
    model = FakeModel(hold_first=True)

    async def scenario() -> None:
        micro = batcher(model)
        try:
            first = asyncio.ensure_future(micro.submit("decode", job(0)))
            await model.wait_started()
            jobs = [micro.submit("encode" if i % 2 else "decode", job(i)) for i in range(1, 7)]
            rest = asyncio.ensure_future(asyncio.gather(*jobs))
            await asyncio.sleep(0.05)
            model.release.set()
            await first
            await rest
        finally:
            await micro.stop()

    run(scenario)
    by_op = dict(zip(model.ops[1:], model.batches[1:], strict=True))
    assert by_op == {"encode": [1.0, 3.0, 5.0], "decode": [2.0, 4.0, 6.0]}


def test_a_failing_job_fails_alone() -> None:
    model = FakeModel(hold_first=True)

    async def scenario() -> list[Any]:
        micro = batcher(model)
        try:
            first = asyncio.ensure_future(micro.submit("double", job(0)))
            await model.wait_started()
            rest = asyncio.ensure_future(submit_all(micro, [job(1), job(POISON), job(3)]))
            await asyncio.sleep(0.05)
            model.release.set()
            return [await first, *(await rest)]
        finally:
            await micro.stop()

    results = run(scenario)
    assert results[1]["y"].tolist() == [2.0]
    assert isinstance(results[2], ValueError)
    assert results[3]["y"].tolist() == [6.0]
    # The shared pass failed, then each job was retried once on its own.
    assert model.batches[1:] == [[1.0, POISON, 3.0], [1.0], [POISON], [3.0]]


def test_a_lone_failing_job_is_not_retried() -> None:
    model = FakeModel()

    async def scenario() -> Any:
        micro = batcher(model)
        try:
            return (await submit_all(micro, [job(POISON)]))[0]
        finally:
            await micro.stop()

    assert isinstance(run(scenario), ValueError)
    assert model.batches == [[POISON]]


def test_a_full_queue_answers_overloaded() -> None:
    model = FakeModel(hold_first=True)

    async def scenario() -> list[Any]:
        micro = batcher(model, max_queue_images=4)
        try:
            first = asyncio.ensure_future(micro.submit("double", job(0)))
            await model.wait_started()  # taken off the queue: the queue is empty again
            queued = asyncio.ensure_future(micro.submit("double", job(1, 1, 1)))
            await asyncio.sleep(0)
            with pytest.raises(Overloaded) as refused:
                await micro.submit("double", job(2, 2))  # 3 + 2 > 4
            fits = asyncio.ensure_future(micro.submit("double", job(3)))  # 3 + 1 <= 4
            await asyncio.sleep(0)
            model.release.set()
            return [refused.value, await first, await queued, await fits]
        finally:
            await micro.stop()

    refused, *served = run(scenario)
    assert isinstance(refused, Unavailable)
    assert refused.status_code == 503 and refused.reason == "overloaded"
    assert refused.retry_after >= 1
    assert "fake" in refused.detail
    assert [r["y"].tolist() for r in served] == [[0.0], [2.0, 2.0, 2.0], [6.0]]
    assert [2.0, 2.0] not in model.batches


def test_a_request_past_its_deadline_times_out_and_is_dropped() -> None:
    model = FakeModel(hold_first=True)

    async def scenario() -> tuple[BaseException, float]:
        micro = batcher(model, timeout_s=0.2)
        try:
            first = asyncio.ensure_future(micro.submit("double", job(0)))
            await model.wait_started()
            started = time.perf_counter()
            with pytest.raises(RequestTimeout) as late:
                await micro.submit("double", job(7))  # queued behind a pass that never ends
            waited = time.perf_counter() - started
            model.release.set()
            with pytest.raises(RequestTimeout):
                await first  # the held pass outlived its deadline too
            await micro.submit("double", job(8))  # and the batcher still works
            return late.value, waited
        finally:
            await micro.stop()

    late, waited = run(scenario)
    assert isinstance(late, ServiceError)
    assert late.status_code == 504 and late.reason == "timeout"
    assert 0.15 < waited < 5.0
    assert [7.0] not in model.batches  # a timed-out job still queued is never run
    assert [8.0] in model.batches


def test_a_lone_request_does_not_wait() -> None:
    async def scenario() -> float:
        micro = batcher(FakeModel(), max_wait_s=0.0)
        try:
            await micro.submit("double", job(0))  # starts the thread
            started = time.perf_counter()
            await micro.submit("double", job(1))
            return time.perf_counter() - started
        finally:
            await micro.stop()

    assert run(scenario) < 0.05


def test_max_wait_gathers_before_running() -> None:
    model = FakeModel()

    async def scenario() -> float:
        micro = batcher(model, max_wait_s=0.2)
        try:
            started = time.perf_counter()
            first = asyncio.ensure_future(micro.submit("double", job(1)))
            await asyncio.sleep(0.05)  # arrives during the wait: joins the same pass
            await micro.submit("double", job(2))
            await first
            return time.perf_counter() - started
        finally:
            await micro.stop()

    elapsed = run(scenario)
    assert elapsed >= 0.15
    assert model.batches == [[1.0, 2.0]]


def test_stop_refuses_queued_requests() -> None:
    async def scenario() -> Inputs | BaseException:
        micro = MicroBatcher(
            "fake", FakeModel(), Metrics(), max_batch_images=8, max_queue_images=8
        )  # never started: requests stay queued
        waiting = asyncio.ensure_future(micro.submit("double", job(1)))
        await asyncio.sleep(0)
        await micro.stop()
        return (await asyncio.gather(waiting, return_exceptions=True))[0]

    refused = run(scenario)
    assert isinstance(refused, Unavailable)
    assert refused.status_code == 503


def test_metrics_record_each_pass_and_the_queue() -> None:
    model = FakeModel(hold_first=True)
    metrics = Metrics()

    def sample(name: str, labels: dict[str, str]) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    async def scenario() -> float | None:
        micro = MicroBatcher(
            "fake", model, metrics, max_batch_images=64, max_queue_images=64, timeout_s=10
        )
        micro.start()
        try:
            first = asyncio.ensure_future(micro.submit("double", job(0)))
            await model.wait_started()
            rest = asyncio.ensure_future(submit_all(micro, [job(1, 1), job(2, 2, 2)]))
            await asyncio.sleep(0.05)
            depth = sample("vae_queue_depth", {"model": "fake"})
            model.release.set()
            await first
            await rest
            return depth
        finally:
            await micro.stop()

    assert run(scenario) == 5.0  # both waiting jobs' images
    labels = {"model": "fake", "op": "double"}
    assert sample("vae_batch_size_count", labels) == 2.0
    assert sample("vae_batch_size_sum", labels) == 6.0
    assert sample("vae_inference_duration_seconds_count", labels) == 2.0
    assert sample("vae_queue_depth", {"model": "fake"}) == 0.0


def test_concurrent_http_requests_get_their_own_images(trained_checkpoint: Path) -> None:
    """Through the real app and model: requests batched together still get their own results."""
    settings = Settings(checkpoints=str(trained_checkpoint), device="cpu", max_batch_wait_ms=50)
    with TestClient(create_app(settings)) as client:
        seeds = list(range(100, 112))
        alone = {seed: client.post("/sample", params={"seed": seed}).content for seed in seeds}
        name = client.get("/models").json()["default"]
        # /sample from the fitted prior runs the "sample" op (decode, then the digit check).
        labels = {"model": name, "op": "sample"}
        passes = metric(client, "vae_batch_size_count", labels)
        images = metric(client, "vae_batch_size_sum", labels)
        with ThreadPoolExecutor(len(seeds)) as pool:
            together = dict(
                zip(
                    seeds,
                    pool.map(lambda s: client.post("/sample", params={"seed": s}), seeds),
                    strict=True,
                )
            )
        for seed, response in together.items():
            assert response.status_code == 200
            assert response.headers["x-seed"] == str(seed)
            got, expected = pixels(response.content), pixels(alone[seed])
            assert np.abs(got.astype(int) - expected).max() <= 2, seed
        assert metric(client, "vae_batch_size_sum", labels) == images + len(seeds)
        # Sent at once, they share forward passes (the 50 ms wait makes this loose).
        assert metric(client, "vae_batch_size_count", labels) - passes < len(seeds)
