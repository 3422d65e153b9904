"""Faults in the forward pass (the X-Test-Fault hook), out-of-memory, and draining at shutdown.

The app runs in process; the hook is on only where a test turns VAE_ENABLE_TEST_HOOKS on.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from app_testing import files, metric, open_image, png_of
from fastapi.testclient import TestClient

from app.errors import ShuttingDown
from app.main import create_app
from app.metrics import Metrics
from app.service.batching import MicroBatcher
from app.service.faults import FAULT_OOM, FAULT_RAISE, parse_fault
from app.settings import Settings

Inputs = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def hooked(trained_checkpoint: Path) -> Iterator[TestClient]:
    """The app with test hooks on; server-side exceptions become 500s, as over the wire."""
    app = create_app(
        Settings(checkpoints=str(trained_checkpoint), device="cpu", enable_test_hooks=True)
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def fault(kind: str) -> dict[str, str]:
    return {"X-Test-Fault": kind}


def assert_serves(client: TestClient) -> None:
    """The next request succeeds and readiness still says ready."""
    response = client.post("/sample", params={"n": 2, "seed": 1})
    assert response.status_code == 200
    open_image(response.content).load()
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    ("value", "code"),
    [("raise", FAULT_RAISE), (" OOM ", FAULT_OOM), ("slow=0.25", 0.25), ("slow=60", 60.0)],
)
def test_fault_header_values(value: str, code: float) -> None:
    assert parse_fault(value) == code


@pytest.mark.parametrize("value", ["", "crash", "slow", "slow=0", "slow=-1", "slow=61", "slow=x"])
def test_unknown_fault_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="X-Test-Fault"):
        parse_fault(value)


@pytest.mark.slow
def test_unknown_fault_header_is_400(hooked: TestClient) -> None:
    response = hooked.post("/sample", headers=fault("explode"))
    assert response.status_code == 400
    assert "raise, oom or slow" in response.json()["detail"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "path", ["/sample", "/decode", "/encode", "/reconstruct", "/anomaly-score", "/similar"]
)
def test_a_raising_forward_pass_is_a_500_for_that_request_only(
    hooked: TestClient, path: str
) -> None:
    latent_dim = hooked.get("/models").json()["models"][0]["latent_dim"]
    kwargs: dict[str, Any] = {"files": files(png_of(torch.rand(1, 28, 28)))}
    if path == "/sample":
        kwargs = {"params": {"n": 3}}
    elif path == "/decode":
        kwargs = {"json": {"z": [[0.0] * latent_dim], "digit": 1}}
    response = hooked.post(path, headers=fault("raise"), **kwargs)
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert "failed on this request" in response.json()["detail"]
    assert_serves(hooked)


@pytest.mark.slow
def test_requests_batched_with_a_faulty_one_still_succeed(hooked: TestClient) -> None:
    state = hooked.app.state.service  # type: ignore[attr-defined]
    batcher = state.repository.deployed(None).batcher  # the one model's serving version
    passes: list[int] = []
    real_run = batcher._run

    def recording_run(op: str, inputs: Inputs) -> Inputs:
        passes.append(len(next(iter(inputs.values()))))
        return real_run(op, inputs)

    batcher._run = recording_run
    try:
        with ThreadPoolExecutor(8) as pool:
            # A slow request holds the model, so that the next ones queue up together...
            blocker = pool.submit(hooked.post, "/sample", headers=fault("slow=0.5"))
            deadline = time.monotonic() + 10
            while not passes:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            # ...one faulty request and four good ones, each of one image.
            bad = pool.submit(hooked.post, "/sample", headers=fault("raise"))
            good = [pool.submit(hooked.post, "/sample", params={"seed": i}) for i in range(4)]
            responses = [blocker.result(), bad.result(), *(f.result() for f in good)]
    finally:
        batcher._run = real_run
    statuses = [r.status_code for r in responses]
    assert statuses == [200, 500, 200, 200, 200, 200]
    for response in responses[2:]:
        open_image(response.content).load()
    # The slow pass, the failed pass of all five, then each alone (the faulty one fails again).
    assert passes == [1, 5, 1, 1, 1, 1, 1]
    assert_serves(hooked)


@pytest.mark.slow
def test_out_of_memory_is_a_413_and_the_server_keeps_serving(hooked: TestClient) -> None:
    before = metric(hooked, "vae_requests_rejected_total", {"reason": "too_large"})
    response = hooked.post("/sample", params={"n": 4}, headers=fault("oom"))
    assert response.status_code == 413
    assert "ran out of memory" in response.json()["detail"]
    after = metric(hooked, "vae_requests_rejected_total", {"reason": "too_large"})
    assert after == before + 1
    assert_serves(hooked)


@pytest.mark.slow
def test_a_slow_forward_pass_past_the_deadline_is_a_504(trained_checkpoint: Path) -> None:
    settings = Settings(
        checkpoints=str(trained_checkpoint),
        device="cpu",
        enable_test_hooks=True,
        request_timeout_s=0.3,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        started = time.perf_counter()
        response = client.post("/sample", headers=fault("slow=2"))
        assert response.status_code == 504
        assert time.perf_counter() - started < 1.5  # answered at the deadline, not after
        assert response.headers["retry-after"] == "1"
        assert "waited more than 0.3 s" in response.json()["detail"]
        time.sleep(max(0.0, started + 2.2 - time.perf_counter()))  # the slow pass ends
        assert metric(client, "vae_requests_rejected_total", {"reason": "timeout"}) == 1
        assert_serves(client)


@pytest.mark.slow
def test_the_fault_header_is_ignored_without_test_hooks(client: TestClient) -> None:
    for kind in ("raise", "oom", "slow=5", "nonsense"):
        started = time.perf_counter()
        response = client.post("/sample", headers=fault(kind))
        assert response.status_code == 200
        assert time.perf_counter() - started < 4


def test_test_hooks_are_off_by_default() -> None:
    assert Settings(checkpoints="unused").enable_test_hooks is False


def test_stop_lets_the_running_pass_finish_and_refuses_new_jobs() -> None:
    started, release = threading.Event(), threading.Event()

    def held_double(op: str, inputs: Inputs) -> Inputs:
        started.set()
        assert release.wait(10)
        return {"y": inputs["x"] * 2}

    async def scenario() -> tuple[Any, Any, Any]:
        micro = MicroBatcher("held", held_double, Metrics(), max_batch_images=1, max_queue_images=8)
        micro.start()
        running = asyncio.ensure_future(micro.submit("double", {"x": torch.ones(1)}))
        assert await asyncio.to_thread(started.wait, 10)
        queued = asyncio.ensure_future(micro.submit("double", {"x": torch.full((1,), 3.0)}))
        await asyncio.sleep(0)
        stopping = asyncio.ensure_future(micro.stop())
        await asyncio.sleep(0.05)
        late = await asyncio.gather(
            micro.submit("double", {"x": torch.ones(1)}), return_exceptions=True
        )
        assert not stopping.done()  # waiting for the pass under way and the queued job
        release.set()
        await stopping
        return await running, await queued, late[0]

    running, queued, late = asyncio.run(scenario())
    assert running["y"].tolist() == [2.0]
    assert queued["y"].tolist() == [6.0]
    assert isinstance(late, ShuttingDown)
    assert late.status_code == 503


def test_stop_gives_up_on_a_stuck_pass_after_its_timeout() -> None:
    # The callers may wait 10 s; stop() gives the stuck pass 0.3 s. An unbounded stop() would
    # return only when the callers give up (with equal deadlines the two cannot be told apart),
    # and the callers of the stuck pass and of the queue are told to retry at once.
    release = threading.Event()

    def stuck(op: str, inputs: Inputs) -> Inputs:
        release.wait(10)
        return {"y": inputs["x"]}

    async def scenario() -> tuple[float, BaseException | Inputs]:
        micro = MicroBatcher(
            "stuck", stuck, Metrics(), max_batch_images=8, max_queue_images=8, timeout_s=10
        )
        micro.start()
        running = asyncio.ensure_future(micro.submit("op", {"x": torch.ones(1)}))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(micro.submit("op", {"x": torch.ones(1)}))
        await asyncio.sleep(0.05)
        began = time.perf_counter()
        try:
            await asyncio.wait_for(micro.stop(timeout_s=0.3), 3)
        finally:
            release.set()
        elapsed = time.perf_counter() - began
        results = await asyncio.gather(running, queued, return_exceptions=True)
        assert all(isinstance(r, ShuttingDown) for r in results), results
        return elapsed, results[0]

    elapsed, result = asyncio.run(scenario())
    assert 0.3 <= elapsed < 1.5
    assert isinstance(result, ShuttingDown) and result.status_code == 503


def test_shutting_down_is_counted_under_its_own_reason() -> None:
    assert ShuttingDown("x").reason == "shutting_down"
    assert ShuttingDown("x").status_code == 503
