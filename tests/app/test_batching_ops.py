"""Batching of every op through the real app and model: requests that differ in k, digit,
number of images, n and scale share one forward pass and still each get exactly the answer
they get alone (to float rounding).

The requests are sent once one at a time, then all at once while a slow request (the test
fault hook) holds the model, so that they all wait in the queue and leave it in one pass per op.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from app_testing import JSON_ACCEPT, decode_b64_png, files, metric, png_of
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

pytestmark = pytest.mark.slow

HOLD_S = 3.0  # how long the blocking request holds the model while the others queue


@dataclass(frozen=True)
class Call:
    """One request: the route, its query and how many uploaded test digits (from `first`)."""

    path: str
    params: dict[str, Any]
    uploads: int
    first: int = 0


# Each group is one kind of difference that batching must keep apart.
SIMILAR_K = {
    "k=1": Call("/similar", {"k": 1}, 1, first=0),
    "k=5": Call("/similar", {"k": 5}, 1, first=1),
    "k=20, two images": Call("/similar", {"k": 20}, 2, first=2),
    "k=3": Call("/similar", {"k": 3}, 1, first=4),
}
DIGIT_GIVEN_OR_NOT = {
    "encode, digit 3": Call("/encode", {"digit": 3}, 2, first=5),
    "encode, predicted": Call("/encode", {}, 2, first=7),
    "similar, digit 8": Call("/similar", {"k": 4, "digit": 8}, 1, first=9),
    "similar, predicted": Call("/similar", {"k": 4}, 1, first=10),
    "reconstruct, digit 1": Call("/reconstruct", {"digit": 1}, 1, first=11),
}
UPLOAD_SIZES = {
    "encode, 1 image": Call("/encode", {}, 1, first=12),
    "encode, 4 images": Call("/encode", {}, 4, first=13),
    "reconstruct, 3 images": Call("/reconstruct", {}, 3, first=17),
    "reconstruct, 1 image": Call("/reconstruct", {}, 1, first=20),
    "anomaly, 2 images": Call("/anomaly-score", {"heatmap": "true"}, 2, first=21),
    "anomaly, 5 images": Call("/anomaly-score", {"heatmap": "true"}, 5, first=23),
    "anomaly, 1 image": Call("/anomaly-score", {"heatmap": "true"}, 1, first=28),
}
VARIATIONS = {
    "n=1 scale 0.5": Call("/variations", {"n": 1, "scale": 0.5, "seed": 1}, 1, first=29),
    "n=6 scale 2": Call("/variations", {"n": 6, "scale": 2.0, "seed": 2}, 1, first=30),
    "n=3 scale 0": Call("/variations", {"n": 3, "scale": 0.0, "seed": 3}, 1, first=31),
    "n=6 scale 1, digit 4": Call(
        "/variations", {"n": 6, "scale": 1.0, "seed": 4, "digit": 4}, 1, first=32
    ),
}
CALLS = {**SIMILAR_K, **DIGIT_GIVEN_OR_NOT, **UPLOAD_SIZES, **VARIATIONS}
OP_OF_PATH = {
    "/similar": "similar",
    "/encode": "encode",
    "/reconstruct": "reconstruct",
    "/anomaly-score": "anomaly",
    "/variations": "encode",  # then decode
}


@dataclass
class Rounds:
    alone: dict[str, dict[str, Any]]
    together: dict[str, dict[str, Any]]
    passes: dict[str, float]  # forward passes per op while the requests were sent together


def send(client: TestClient, call: Call, digits: list[bytes]) -> dict[str, Any]:
    uploads = digits[call.first : call.first + call.uploads]
    response = client.post(
        call.path, params=call.params, files=files(*uploads), headers=JSON_ACCEPT
    )
    assert response.status_code == 200, (call, response.text)
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="module")
def rounds(
    trained_checkpoint: Path, mnist_test: tuple[torch.Tensor, torch.Tensor]
) -> Iterator[Rounds]:
    images, _ = mnist_test
    digits = [png_of(image) for image in images[:40]]
    settings = Settings(checkpoints=str(trained_checkpoint), device="cpu", enable_test_hooks=True)
    with TestClient(create_app(settings)) as client:
        name = client.get("/models").json()["default"]
        alone = {key: send(client, call, digits) for key, call in CALLS.items()}

        def passes() -> dict[str, float]:
            text = client.get("/metrics").text
            return {
                op: metric(client, "vae_batch_size_count", {"model": name, "op": op}, text)
                for op in ("encode", "decode", "sample", "reconstruct", "anomaly", "similar")
            }

        before = passes()
        queued = sum(call.uploads for call in CALLS.values())
        with ThreadPoolExecutor(len(CALLS) + 1) as pool:
            blocker = pool.submit(
                client.post, "/sample", headers={"X-Test-Fault": f"slow={HOLD_S}"}
            )
            wait_for(lambda: metric(client, "vae_requests_in_flight") >= 2, "the blocker")
            time.sleep(0.1)  # its forward pass has begun: nothing else joins it
            sent = {key: pool.submit(send, client, call, digits) for key, call in CALLS.items()}
            # Every request waits in the queue before the model is free again.
            wait_for(
                lambda: metric(client, "vae_queue_depth", {"model": name}) == queued,
                f"{queued} queued images",
            )
            assert not blocker.done(), "the blocker ended before all were queued: raise HOLD_S"
            together = {key: future.result() for key, future in sent.items()}
            assert blocker.result().status_code == 200
        after = passes()
        yield Rounds(alone, together, {op: after[op] - before[op] for op in after})


def wait_for(condition: Callable[[], bool], what: str, within_s: float = HOLD_S) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def assert_close(alone: Any, together: Any, where: str) -> None:
    """Equal JSON, floats to batched-arithmetic rounding, base64 PNGs to one grey level."""
    if isinstance(alone, dict):
        assert alone.keys() == together.keys(), where
        for key in alone:
            assert_close(alone[key], together[key], f"{where}.{key}")
    elif isinstance(alone, list):
        assert len(alone) == len(together), f"{where}: {len(alone)} != {len(together)}"
        for i, (a, b) in enumerate(zip(alone, together, strict=True)):
            assert_close(a, b, f"{where}[{i}]")
    elif isinstance(alone, float):
        assert together == pytest.approx(alone, rel=1e-4, abs=1e-4), where
    elif isinstance(alone, str) and len(alone) > 100:  # a base64 PNG
        difference = decode_b64_png(alone).astype(int) - decode_b64_png(together)
        assert np.abs(difference).max() <= 1, where
    else:
        assert alone == together, where


def assert_same_answers(rounds: Rounds, calls: dict[str, Call]) -> None:
    for key in calls:
        assert_close(rounds.alone[key], rounds.together[key], key)


def test_similar_requests_with_different_k_share_a_pass_and_get_k_neighbours_each(
    rounds: Rounds,
) -> None:
    assert_same_answers(rounds, SIMILAR_K)
    for key, call in SIMILAR_K.items():
        for item in rounds.together[key]["items"]:
            assert len(item["neighbours"]) == call.params["k"], key
    assert rounds.passes["similar"] == 1


def test_requests_with_and_without_a_digit_share_a_pass(rounds: Rounds) -> None:
    assert_same_answers(rounds, DIGIT_GIVEN_OR_NOT)
    for key, call in DIGIT_GIVEN_OR_NOT.items():
        items = rounds.together[key]["items"]
        if "digit" in call.params and call.path != "/reconstruct":
            assert {item["digit"] for item in items} == {call.params["digit"]}, key
    assert rounds.passes["encode"] == rounds.passes["similar"] == 1


def test_uploads_of_different_sizes_share_a_pass_and_get_their_own_items(rounds: Rounds) -> None:
    assert_same_answers(rounds, UPLOAD_SIZES)
    for key, call in UPLOAD_SIZES.items():
        assert len(rounds.together[key]["items"]) == call.uploads, key
    assert rounds.passes["encode"] == rounds.passes["reconstruct"] == 1
    assert rounds.passes["anomaly"] == 1


def test_variations_with_different_n_and_scale_share_passes(rounds: Rounds) -> None:
    assert_same_answers(rounds, VARIATIONS)
    for key, call in VARIATIONS.items():
        assert len(rounds.together[key]["images"]) == call.params["n"], key
    # The encodes leave the queue in one pass; their decodes are all queued while the next
    # op's pass runs, so they share one too (the blocker's /sample is a "sample" op).
    assert rounds.passes["encode"] == 1
    assert rounds.passes["decode"] == 1
    assert rounds.passes["sample"] == 1
