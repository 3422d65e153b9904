"""Tests for training/trainer.py on a toy regression model: the loop knows nothing about VAEs."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from training.trainer import (
    Callback,
    EpochSummary,
    StepOutput,
    Trainer,
    TrainerSettings,
    TrainingError,
)


class ToyBatches:
    """y = x @ w + noise, shuffled each epoch by `generator`, in batches of 8."""

    def __init__(self, generator: torch.Generator, count: int = 64) -> None:
        data = torch.Generator().manual_seed(0)
        self.x = torch.randn(count, 3, generator=data)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.01 * torch.randn(count, generator=data)
        self.generator = generator

    def __len__(self) -> int:
        return len(self.x) // 8

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.x), generator=self.generator)
        for batch in order.split(8):
            yield self.x[batch], self.y[batch]


def squared_error(model: nn.Module, x: Tensor, y: Tensor, step: int) -> StepOutput:
    # Random noise in the loss makes the global RNG part of what a resume has to restore.
    jitter = 1e-3 * torch.randn(())
    loss = (model(x).squeeze(1) - y).pow(2).mean() + jitter
    return StepOutput(loss=loss, logs={"jitter": jitter, "step": float(step)})


def make_trainer(
    epochs: int = 3,
    callbacks: tuple[Callback, ...] = (),
    validate: object = None,
    **settings: object,
) -> Trainer:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    return Trainer(
        nn.Linear(3, 1),
        squared_error,
        ToyBatches(generator),
        TrainerSettings(epochs=epochs, lr=0.05, progress=False, **settings),  # type: ignore[arg-type]
        validate=validate,  # type: ignore[arg-type]
        callbacks=callbacks,
        data_generator=generator,
    )


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.summaries: list[EpochSummary] = []

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.events.append(f"start {epoch}")

    def on_batch_end(self, trainer: Trainer, output: StepOutput) -> None:
        self.events.append(f"batch {trainer.step}")

    def on_epoch_end(self, trainer: Trainer, summary: EpochSummary) -> None:
        self.events.append(f"end {summary.epoch}")
        self.summaries.append(summary)

    def on_train_end(self, trainer: Trainer) -> None:
        self.events.append("train end")


def test_callbacks_run_in_order_around_every_batch_and_epoch() -> None:
    recorder = Recorder()
    make_trainer(epochs=2, callbacks=(recorder,)).fit()
    expected = [
        "start 1",
        *(f"batch {s}" for s in range(1, 9)),
        "end 1",
        "start 2",
        *(f"batch {s}" for s in range(9, 17)),
        "end 2",
        "train end",
    ]
    assert recorder.events == expected


def test_training_reduces_the_loss_and_summarises_each_epoch() -> None:
    recorder = Recorder()
    trainer = make_trainer(epochs=10, callbacks=(recorder,), lr_schedule="none")
    trainer.fit()
    losses = [s.train_loss for s in recorder.summaries]
    assert losses[-1] < 0.1 * losses[0]
    assert recorder.summaries[0].train_logs["step"] == pytest.approx(3.5)  # mean of steps 0..7
    assert trainer.epoch == 10 and trainer.step == 80
    assert [entry["epoch"] for entry in trainer.history] == list(range(1, 11))


def test_cosine_schedule_decays_to_zero_and_none_keeps_the_rate() -> None:
    cosine = make_trainer(epochs=2, lr_schedule="cosine")
    cosine.fit()
    assert cosine.history[0]["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert cosine.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    constant = make_trainer(epochs=2, lr_schedule="none")
    constant.fit()
    assert [entry["lr"] for entry in constant.history] == [0.05, 0.05]


def test_gradients_are_clipped_to_the_given_norm() -> None:
    norms: list[float] = []

    class GradientNorm(Callback):
        def on_batch_end(self, trainer: Trainer, output: StepOutput) -> None:
            grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))

    make_trainer(epochs=1, callbacks=(GradientNorm(),), grad_clip=0.01).fit()
    assert max(norms) <= 0.01 + 1e-6


def test_early_stopping_after_patience_epochs_without_improvement() -> None:
    scores = iter([1.0, 3.0, 2.0, 2.5, 2.9, 5.0])
    trainer = make_trainer(epochs=6, validate=lambda model: next(scores), patience=3)
    trainer.fit()
    assert trainer.stopped_early
    assert trainer.epoch == 5
    assert (trainer.best_epoch, trainer.best_score) == (2, 3.0)


def test_best_score_tracks_the_highest_validation_score() -> None:
    recorder = Recorder()
    scores = iter([1.0, 0.5, 2.0])
    make_trainer(epochs=3, callbacks=(recorder,), validate=lambda model: next(scores)).fit()
    assert [s.improved for s in recorder.summaries] == [True, False, True]


def test_a_diverging_loss_stops_with_advice() -> None:
    def exploding(model: nn.Module, x: Tensor, y: Tensor, step: int) -> StepOutput:
        return StepOutput(loss=model(x).sum() * float("nan"))

    trainer = make_trainer(epochs=2)
    trainer.loss_fn = exploding
    with pytest.raises(TrainingError, match="--lr"):
        trainer.fit()


def test_epoch_summary_is_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="training.trainer"):
        make_trainer(epochs=2, validate=lambda model: -1.5, validation_name="val ELBO").fit()
    lines = [r.getMessage() for r in caplog.records if r.name == "training.trainer"]
    assert len(lines) == 2
    assert lines[0].startswith("epoch   1/2")
    assert "train loss" in lines[0] and "val ELBO -1.50" in lines[0] and lines[0].endswith("s")


def test_amp_is_only_used_on_cuda() -> None:
    trainer = make_trainer(amp=True)
    assert trainer.use_amp == (trainer.device.type == "cuda")


def test_state_survives_weights_only_load_and_resumes_exactly() -> None:
    uninterrupted = make_trainer(epochs=4)
    uninterrupted.fit()

    first = make_trainer(epochs=4)
    first.settings = TrainerSettings(epochs=2, lr=0.05, progress=False)
    first.fit()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    weights = {k: v.clone() for k, v in first.model.state_dict().items()}
    torch.manual_seed(123)  # whatever ran in between must not matter

    resumed = make_trainer(epochs=4)
    resumed.model.load_state_dict(weights)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.epoch == 2
    resumed.fit()

    assert resumed.step == uninterrupted.step == 32
    for name, value in uninterrupted.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    assert resumed.history[-1]["train_loss"] == uninterrupted.history[-1]["train_loss"]


def test_empty_batches_are_refused() -> None:
    generator = torch.Generator()
    with pytest.raises(ValueError, match="at least one batch"):
        Trainer(
            nn.Linear(3, 1),
            squared_error,
            ToyBatches(generator, count=0),
            TrainerSettings(epochs=1, lr=0.1),
        )
