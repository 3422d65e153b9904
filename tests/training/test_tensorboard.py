"""Tests for training/tensorboard.py: what the callback writes, and the missing-package error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from models import VAE, VAEConfig
from training.config import ConfigError
from training.data import Batches, Split
from training.objective import VAEObjective
from training.tensorboard import (
    ScalarImageWriter,
    TensorBoardCallback,
    open_writer,
    require_tensorboard,
)
from training.trainer import Trainer, TrainerSettings


class FakeWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.images: list[tuple[str, tuple[int, ...], int]] = []
        self.closed = False

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None:
        self.scalars.append((tag, float(scalar_value), global_step))

    def add_image(self, tag: str, img_tensor: Tensor, global_step: int) -> None:
        self.images.append((tag, tuple(img_tensor.shape), global_step))

    def close(self) -> None:
        self.closed = True


def fit_two_epochs(writer: ScalarImageWriter) -> None:
    """Two epochs of 4 steps of a tiny MLP VAE, logging to `writer` every 2 steps."""
    torch.manual_seed(0)
    model = VAE(VAEConfig(architecture="mlp", hidden_dims=(16,), latent_dim=2))
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    batches = Batches(Split(images, torch.arange(40) % 10), 10)
    Trainer(
        model,
        VAEObjective(beta=1.0, kl_warmup_epochs=1, steps_per_epoch=len(batches)),
        batches,
        TrainerSettings(epochs=2, lr=1e-3, progress=False),
        validate=lambda m: -1.0,
        callbacks=[TensorBoardCallback(writer, model, every=2)],
    ).fit()


def test_callback_writes_scalars_and_a_sample_grid_per_epoch() -> None:
    writer = FakeWriter()
    fit_two_epochs(writer)
    tags = {tag for tag, _, _ in writer.scalars}
    assert {"train/loss", "train/recon", "train/kl", "train/beta", "train/lr"} <= tags
    assert {"val/elbo", "epoch/train_loss", "epoch/seconds"} <= tags
    assert sorted({step for tag, _, step in writer.scalars if tag == "train/loss"}) == [2, 4, 6, 8]
    assert writer.images == [("samples", (3, 302, 302), 1), ("samples", (3, 302, 302), 2)]
    assert writer.closed


def test_the_real_writer_leaves_an_event_file_tensorboard_reads(tmp_path: Path) -> None:
    # tensorboard is a dev dependency: CI runs torch's SummaryWriter, not only the fake one.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit_two_epochs(open_writer(tmp_path / "tb"))
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/kl", "train/lr", "val/elbo", "epoch/train_loss"} <= set(
        tags["scalars"]
    )
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]
    assert [e.value for e in events.Scalars("val/elbo")] == [-1.0, -1.0]
    samples = events.Images("samples")
    assert [(e.step, e.width, e.height) for e in samples] == [(1, 302, 302), (2, 302, 302)]
    assert all(e.encoded_image_string.startswith(b"\x89PNG") for e in samples)


@pytest.mark.usefixtures("no_tensorboard")
def test_missing_tensorboard_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        require_tensorboard()
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        open_writer(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()
