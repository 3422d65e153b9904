"""Optional TensorBoard logging: train scalars per step; validation and a sample grid per epoch."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

from torch import Tensor

from models import VAE
from training.config import ConfigError
from training.generate import sample_grid
from training.trainer import Callback, EpochSummary, StepOutput, Trainer


class ScalarImageWriter(Protocol):
    """The part of torch.utils.tensorboard.SummaryWriter this callback uses."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None: ...

    def add_image(self, tag: str, img_tensor: Tensor, global_step: int) -> None: ...

    def close(self) -> None: ...


def require_tensorboard() -> None:
    """Fail before training, not after it, when --tensorboard was asked for but cannot work."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "--tensorboard needs the tensorboard package, which is not installed: "
            "pip install tensorboard (or pip install 'vae-serve[tensorboard]')"
        )


def open_writer(log_dir: Path) -> ScalarImageWriter:
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    writer: ScalarImageWriter = SummaryWriter(log_dir=str(log_dir))
    return writer


class TensorBoardCallback(Callback):
    """Writes train/* every `every` steps, val/elbo, epoch/* and a fixed-seed sample grid."""

    def __init__(self, writer: ScalarImageWriter, model: VAE, seed: int = 0, every: int = 10):
        self.writer = writer
        self.model = model
        self.seed = seed
        self.every = every

    def on_batch_end(self, trainer: Trainer, output: StepOutput) -> None:
        if trainer.step % self.every:
            return
        self.writer.add_scalar("train/loss", float(output.loss.detach()), trainer.step)
        for name, value in output.logs.items():
            self.writer.add_scalar(f"train/{name}", float(value), trainer.step)
        self.writer.add_scalar("train/lr", trainer.optimizer.param_groups[0]["lr"], trainer.step)

    def on_epoch_end(self, trainer: Trainer, summary: EpochSummary) -> None:
        step = trainer.step
        self.writer.add_scalar("epoch/train_loss", summary.train_loss, step)
        self.writer.add_scalar("epoch/seconds", summary.seconds, step)
        if summary.val_score is not None:
            self.writer.add_scalar("val/elbo", summary.val_score, step)
        # A seeded generator of its own: drawing samples must not move the training RNG.
        self.writer.add_image("samples", sample_grid(self.model, self.seed), summary.epoch)

    def on_train_end(self, trainer: Trainer) -> None:
        self.writer.close()
