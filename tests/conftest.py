"""Session fixtures shared by the training and service tests: checkpoints trained once per run."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import models.device
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


# torch.cuda.get_arch_list() of the Docker base image's torch (2.8.0, CUDA 12.8).
CUDA_12_8_ARCHES = ("sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120")


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Makes torch see one GPU of a given compute capability under the image's CUDA 12.8 torch
    build; `kernel_error` makes the test kernel on it fail with that message."""

    def install(
        capability: tuple[int, int], *, name: str = "Fake GPU", kernel_error: str | None = None
    ) -> None:
        def probe(device: torch.device) -> None:
            if kernel_error is not None:
                raise RuntimeError(kernel_error)

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(CUDA_12_8_ARCHES))
        monkeypatch.setattr(models.device, "_run_probe_kernel", probe)

    return install


@pytest.fixture
def no_tensorboard(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine without the tensorboard package (a dev dependency, so installed here)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "tensorboard" else find_spec(name, *args),
    )
