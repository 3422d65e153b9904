"""Tests for training/checkpoints.py: per-epoch last/ and best/ folders and reading them back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models import VAE, load_checkpoint
from training.checkpoints import STATE_FILE, CheckpointCallback, load_resume_point
from training.config import ConfigError, TrainConfig
from training.data import Batches, Split
from training.objective import VAEObjective
from training.trainer import Trainer, TrainerSettings


def random_split(count: int = 32) -> Split:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 1, 28, 28), generator=generator, dtype=torch.uint8)
    return Split(images, torch.arange(count) % 10)


def small_config(out: Path, **changes: object) -> TrainConfig:
    settings: dict[str, object] = {"architecture": "mlp", "hidden_dims": (16,), "latent_dim": 2}
    return TrainConfig(**{**settings, "epochs": 3, "out": str(out), **changes})  # type: ignore[arg-type]


def run_epochs(config: TrainConfig, scores: list[float]) -> VAE:
    """Train `config` on random images with the given validation scores, checkpointing."""
    torch.manual_seed(0)
    model = VAE(config.model_config())
    batches = Batches(random_split(), 16, generator=torch.Generator().manual_seed(0))
    remaining = iter(scores)
    Trainer(
        model,
        VAEObjective(beta=1.0, kl_warmup_epochs=0, steps_per_epoch=len(batches)),
        batches,
        TrainerSettings(epochs=config.epochs, lr=1e-3, progress=False),
        validate=lambda m: next(remaining),
        callbacks=[CheckpointCallback(model, config.out_dir, config)],
        data_generator=batches.generator,
    ).fit()
    return model


def test_last_is_every_epoch_with_state_and_best_only_on_improvement(tmp_path: Path) -> None:
    config = small_config(tmp_path)
    model = run_epochs(config, [-5.0, -3.0, -4.0])
    state_dir = tmp_path / "train_state"
    best = json.loads((state_dir / "best" / "config.json").read_text())["training"]
    last = json.loads((state_dir / "last" / "config.json").read_text())["training"]
    assert (best["epoch"], best["val_elbo"]) == (2, -3.0)
    assert (last["epoch"], last["val_elbo"]) == (3, -4.0)
    assert last["config"] == config.to_dict()
    assert not (state_dir / "best" / STATE_FILE).exists()

    state = torch.load(state_dir / "last" / STATE_FILE, weights_only=True)
    assert (state["epoch"], state["best_epoch"], state["best_score"]) == (3, 2, -3.0)
    assert state["epochs_without_improvement"] == 1
    assert {"optimizer", "scheduler", "cpu_rng", "data_rng", "history"} <= set(state)
    for name, value in load_checkpoint(state_dir / "last").model.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name


def test_resume_point_returns_the_last_weights_and_state(tmp_path: Path) -> None:
    config = small_config(tmp_path)
    model = run_epochs(config, [-5.0, -3.0, -4.0])
    point = load_resume_point(tmp_path, config.replace(resume=True, epochs=5))
    assert point.epoch == 3 and point.trainer_state["step"] == 6
    for name, value in model.state_dict().items():
        assert torch.equal(point.weights[name], value), name


def test_resume_refuses_another_dataset(tmp_path: Path) -> None:
    run_epochs(small_config(tmp_path), [-1.0, -1.0, -1.0])
    with pytest.raises(ConfigError, match="dataset 'mnist-5k' -> 'mnist'"):
        load_resume_point(tmp_path, small_config(tmp_path, dataset="mnist"))


def test_resume_refuses_another_architecture(tmp_path: Path) -> None:
    run_epochs(small_config(tmp_path), [-1.0, -1.0, -1.0])
    with pytest.raises(ConfigError, match="hidden_dims"):
        load_resume_point(tmp_path, small_config(tmp_path, hidden_dims=(8,)))


def test_a_damaged_state_file_is_a_clear_error(tmp_path: Path) -> None:
    config = small_config(tmp_path)
    run_epochs(config, [-1.0, -1.0, -1.0])
    (tmp_path / "train_state" / "last" / STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=f"cannot read .*{STATE_FILE}"):
        load_resume_point(tmp_path, config)


def test_damaged_weights_are_a_clear_error(tmp_path: Path) -> None:
    config = small_config(tmp_path)
    run_epochs(config, [-1.0, -1.0, -1.0])
    weights = tmp_path / "train_state" / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ConfigError, match="sha256"):
        load_resume_point(tmp_path, config)
