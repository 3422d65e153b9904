"""Apps built on the trained checkpoints (tests/conftest.py), loaded once per test module."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from training.data import load_dataset, to_float

CONDITIONAL_NAME = "conditional"
UNCONDITIONAL_NAME = "unconditional"


def serve(**settings: Any) -> Iterator[TestClient]:
    """A client of a fully started app (lifespan run: models loaded and warmed up)."""
    with TestClient(create_app(Settings(**settings))) as client:
        yield client


@pytest.fixture(scope="session")
def mnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    """Real held-out digits: images (N, 1, 28, 28) in [0, 1] and labels (N,)."""
    test = load_dataset("mnist-5k").test
    return to_float(test.images), test.labels


@pytest.fixture(scope="session")
def checkpoint_config(trained_checkpoint: Path) -> dict[str, Any]:
    """config.json of the conditional checkpoint."""
    config: dict[str, Any] = json.loads((trained_checkpoint / "config.json").read_text())
    return config


@pytest.fixture(scope="session")
def named_checkpoints(
    tmp_path_factory: pytest.TempPathFactory,
    trained_checkpoint: Path,
    trained_unconditional_checkpoint: Path,
) -> dict[str, Path]:
    """Both checkpoints copied under known folder names (models are named by their folder)."""
    root = tmp_path_factory.mktemp("served")
    return {
        CONDITIONAL_NAME: Path(shutil.copytree(trained_checkpoint, root / CONDITIONAL_NAME)),
        UNCONDITIONAL_NAME: Path(
            shutil.copytree(trained_unconditional_checkpoint, root / UNCONDITIONAL_NAME)
        ),
    }


@pytest.fixture(scope="module")
def client(trained_checkpoint: Path) -> Iterator[TestClient]:
    """The conditional conv model alone."""
    yield from serve(checkpoints=str(trained_checkpoint), device="cpu")


@pytest.fixture(scope="module")
def model_name(client: TestClient) -> str:
    name: str = client.get("/models").json()["default"]
    return name


@pytest.fixture(scope="module")
def latent_dim(client: TestClient) -> int:
    body = client.get("/models").json()
    (card,) = body["models"]
    return int(card["latent_dim"])


@pytest.fixture(scope="module")
def multi_client(named_checkpoints: dict[str, Path]) -> Iterator[TestClient]:
    """Both models; the conditional one first, so it is the default."""
    paths = ",".join(str(named_checkpoints[n]) for n in (CONDITIONAL_NAME, UNCONDITIONAL_NAME))
    yield from serve(checkpoints=paths, device="cpu")


@pytest.fixture(scope="module")
def limits_client(trained_checkpoint: Path) -> Iterator[TestClient]:
    """Tight upload limits, so over-limit requests stay small and fast to build."""
    yield from serve(
        checkpoints=str(trained_checkpoint),
        device="cpu",
        max_upload_bytes=2000,
        max_json_bytes=64 * 1024,
        max_files=3,
        max_samples=16,
    )
