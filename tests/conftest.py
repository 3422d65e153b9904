"""Session fixtures shared by the training and service tests: checkpoints trained once per run."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import TrainConfig
from training.run import train


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conditional conv VAE trained on mnist-5k with the `tiny` preset (~12 s on 2 CPU cores):
    recognisable digits per row of samples.png, ~90% digit accuracy, calibrated anomaly score."""
    out = tmp_path_factory.mktemp("trained") / "conditional-conv"
    return train(TrainConfig.from_preset("tiny", out=str(out), progress=False)).checkpoint


@pytest.fixture(scope="session")
def trained_unconditional_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unconditional MLP VAE (784-256-16) trained on mnist-5k like the conditional one (~6 s)."""
    out = tmp_path_factory.mktemp("trained") / "unconditional-mlp"
    config = TrainConfig.from_preset(
        "tiny",
        architecture="mlp",
        hidden_dims=(256,),  # one hidden layer trains fastest and still draws clear digits
        latent_dim=16,  # without a label the latent code has to carry the digit's identity too
        conditional=False,
        epochs=20,  # an MLP epoch costs a third of a conv one; more epochs sharpen its samples
        out=str(out),
        progress=False,
    )
    return train(config).checkpoint
