"""Tests for app.http.routes.similar: POST /similar on the trained checkpoints' latent indexes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from app_testing import (
    JSON_ACCEPT,
    decode_b64_png,
    files,
    grid_size,
    grid_tiles,
    metric,
    model_card,
    pixels,
    png_of,
)
from conftest import UNCONDITIONAL_NAME, serve
from fastapi.testclient import TestClient

from app.service.registry import Registry
from app.settings import Settings
from models import CheckpointError
from training.data import load_dataset
from training.index import INDEX_FILE

MnistTest = tuple[torch.Tensor, torch.Tensor]


def held_out(mnist_test: MnistTest, digit: int, count: int) -> list[bytes]:
    images, labels = mnist_test
    return [png_of(images[i]) for i in (labels == digit).nonzero()[:count, 0].tolist()]


def similar(client: TestClient, *uploads: bytes, **params: Any) -> dict[str, Any]:
    response = client.post("/similar", files=files(*uploads), params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="module")
def train_images() -> torch.Tensor:
    """The training split's images, (N, 28, 28) uint8: what the index rows point at."""
    return load_dataset("mnist-5k").train.images[:, 0]


def test_held_out_threes_find_mostly_threes(client: TestClient, mnist_test: MnistTest) -> None:
    body = similar(client, *held_out(mnist_test, 3, 10))
    threes = [sum(n["label"] == 3 for n in item["neighbours"]) for item in body["items"]]
    assert np.mean(threes) >= 6, threes
    assert all(len(item["neighbours"]) == 8 for item in body["items"])  # k defaults to 8


def test_every_digit_finds_its_own_kind(client: TestClient, mnist_test: MnistTest) -> None:
    # Per digit, not averaged over digits: one digit at 0% must not hide behind the others.
    precision = {}
    for digit in range(10):
        items = similar(client, *held_out(mnist_test, digit, 10), k=8)["items"]
        precision[digit] = np.mean(
            [np.mean([n["label"] == digit for n in item["neighbours"]]) for item in items]
        )
    assert min(precision.values()) >= 0.6, precision  # measured 0.8 to 1.0
    assert np.mean(list(precision.values())) >= 0.8, precision


def test_json_names_each_neighbour_with_its_image_and_distance(
    client: TestClient, mnist_test: MnistTest, model_name: str, train_images: torch.Tensor
) -> None:
    body = similar(client, *held_out(mnist_test, 7, 2), k=5)
    assert body["model"] == model_name
    assert body["distance"] == model_card(client)["index"]["distance"]
    assert body["search"] == "within the query's digit"
    for item in body["items"]:
        assert item["digit"] == 7 and 0.5 < item["digit_probability"] <= 1.0
        distances = [n["distance"] for n in item["neighbours"]]
        assert distances == sorted(distances) and all(np.isfinite(distances))
        assert all(n["label"] == item["digit"] for n in item["neighbours"])
        for neighbour in item["neighbours"]:
            # The PNG is the training image itself, byte for byte in pixels.
            assert np.array_equal(
                decode_b64_png(neighbour["image"]), train_images[neighbour["index"]].numpy()
            )


def test_an_upload_from_the_training_split_finds_itself_first(
    client: TestClient, train_images: torch.Tensor
) -> None:
    row = 123
    upload = png_of(train_images[row].float().div(255)[None])
    (item,) = similar(client, upload, k=3)["items"]
    assert item["neighbours"][0]["index"] == row
    assert item["neighbours"][0]["distance"] == pytest.approx(0.0, abs=1e-4)


def test_the_png_grid_has_a_row_per_upload(
    client: TestClient, mnist_test: MnistTest, train_images: torch.Tensor
) -> None:
    uploads = held_out(mnist_test, 0, 2)
    response = client.post(
        "/similar", files=files(*uploads), params={"k": 4}, headers={"accept": "image/png"}
    )
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    grid = pixels(response.content)
    assert grid.shape[::-1] == grid_size(2 * 5, 5)
    tiles = grid_tiles(grid, 10, 5)
    json_items = similar(client, *uploads, k=4)["items"]
    for row, item in enumerate(json_items):
        assert np.array_equal(tiles[row * 5], pixels(uploads[row]))  # the query comes first
        for column, neighbour in enumerate(item["neighbours"], start=1):
            assert np.array_equal(tiles[row * 5 + column], train_images[neighbour["index"]])


def test_a_given_digit_is_searched_instead_of_the_predicted_one(
    client: TestClient, mnist_test: MnistTest
) -> None:
    (item,) = similar(client, *held_out(mnist_test, 3, 1), digit=8)["items"]
    assert item["digit"] == 8 and item["digit_probability"] == 1.0
    assert {n["label"] for n in item["neighbours"]} == {8}


@pytest.mark.parametrize("k", ["0", "65", "two"])
def test_k_out_of_range_is_a_422(client: TestClient, mnist_test: MnistTest, k: str) -> None:
    response = client.post("/similar", files=files(*held_out(mnist_test, 1, 1)), params={"k": k})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "k"]


def test_the_largest_k_is_served(client: TestClient, mnist_test: MnistTest) -> None:
    (item,) = similar(client, *held_out(mnist_test, 1, 1), k=64)["items"]
    assert len(item["neighbours"]) == 64


def test_searches_run_through_the_batcher(client: TestClient, mnist_test: MnistTest) -> None:
    labels = {"model": client.get("/models").json()["default"], "op": "similar"}
    before = metric(client, "vae_inference_duration_seconds_count", labels)
    similar(client, *held_out(mnist_test, 2, 1))
    assert metric(client, "vae_inference_duration_seconds_count", labels) == before + 1


def test_the_model_card_describes_the_index(client: TestClient) -> None:
    index = model_card(client)["index"]
    assert index["size"] == 3600 and index["split"] == "train"
    assert index["search"] == "within the query's digit"
    assert "sha256" not in index  # checked at load; of no use to a client


def test_similar_is_documented(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"]["/similar"]["post"]
    assert {"application/json", "image/png"} <= set(operation["responses"]["200"]["content"])
    assert {p["name"] for p in operation["parameters"]} >= {"k", "digit", "invert", "model"}


# ---- the unconditional model ----------------------------------------------------------------


def test_unconditional_models_search_all_images(
    multi_client: TestClient, mnist_test: MnistTest
) -> None:
    body = similar(multi_client, *held_out(mnist_test, 3, 10), model=UNCONDITIONAL_NAME)
    assert body["search"] == "all images"
    threes = [sum(n["label"] == 3 for n in item["neighbours"]) for item in body["items"]]
    assert np.mean(threes) >= 5, threes
    assert all(item["digit"] is None for item in body["items"])


def test_a_digit_for_an_unconditional_model_is_a_400(
    multi_client: TestClient, mnist_test: MnistTest
) -> None:
    response = multi_client.post(
        "/similar",
        files=files(*held_out(mnist_test, 3, 1)),
        params={"model": UNCONDITIONAL_NAME, "digit": 3},
    )
    assert response.status_code == 400 and "unconditional" in response.json()["detail"]


# ---- checkpoints without an index -----------------------------------------------------------


@pytest.fixture(scope="module")
def no_index_client(
    tmp_path_factory: pytest.TempPathFactory, trained_checkpoint: Path
) -> Iterator[TestClient]:
    """The conditional checkpoint as saved before indexes existed."""
    old = Path(shutil.copytree(trained_checkpoint, tmp_path_factory.mktemp("old") / "old"))
    (old / INDEX_FILE).unlink()
    yield from serve(checkpoints=str(old), device="cpu")


def test_a_model_without_an_index_says_how_to_get_one(
    no_index_client: TestClient, mnist_test: MnistTest
) -> None:
    response = no_index_client.post("/similar", files=files(*held_out(mnist_test, 3, 1)))
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "has no latent index" in detail and "retrain" in detail
    assert model_card(no_index_client)["index"] is None
    # Everything else still works.
    assert no_index_client.post("/encode", files=files(*held_out(mnist_test, 3, 1))).is_success


def test_a_model_without_an_index_refuses_before_reading_the_upload(
    no_index_client: TestClient,
) -> None:
    response = no_index_client.post("/similar", files=files(b"not an image"))
    assert response.status_code == 400 and "latent index" in response.json()["detail"]


def test_a_damaged_index_stops_the_service_from_starting(
    tmp_path: Path, trained_checkpoint: Path
) -> None:
    damaged = Path(shutil.copytree(trained_checkpoint, tmp_path / "damaged"))
    data = bytearray((damaged / INDEX_FILE).read_bytes())
    data[-1] ^= 0xFF
    (damaged / INDEX_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{INDEX_FILE}: sha256 does not match"):
        Registry.load(Settings(checkpoints=str(damaged), device="cpu"))
    # The checksum lives in config.json, written with the index.
    assert json.loads((damaged / "config.json").read_text())["index"]["sha256"]


def test_json_is_the_default_and_png_is_asked_for(
    client: TestClient, mnist_test: MnistTest
) -> None:
    upload = held_out(mnist_test, 4, 1)
    assert client.post("/similar", files=files(*upload)).headers["content-type"] == (
        "application/json"
    )
    response = client.post("/similar", files=files(*upload), headers=JSON_ACCEPT)
    assert response.headers["content-type"] == "application/json"
    for accept in ("image/png", "image/png, application/json;q=0.5", "image/*"):
        asked = client.post("/similar", files=files(*upload), headers={"accept": accept})
        assert asked.headers["content-type"] == "image/png", accept
        assert pixels(asked.content).shape[::-1] == grid_size(9, 9)  # the upload + 8 neighbours
    preferred = client.post(
        "/similar", files=files(*upload), headers={"accept": "image/png;q=0.5, application/json"}
    )
    assert preferred.headers["content-type"] == "application/json"
