"""Tests for training/presets.py: every preset is a valid TrainConfig with the promised model."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from training import presets
from training.config import TrainConfig
from training.presets import PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_a_valid_config_and_model(name: str) -> None:
    config = TrainConfig.from_preset(name)
    assert config.preset == name
    assert config.model_config().latent_dim == config.latent_dim


def test_default_preset_is_the_conditional_conv_vae_on_mnist_5k() -> None:
    config = TrainConfig.from_preset("default")
    assert config == TrainConfig()
    model = config.model_config()
    assert (model.architecture, model.hidden_dims, model.latent_dim) == ("conv", (32, 64), 24)
    assert model.decoder_blocks == 1
    assert model.num_classes == 10 and model.likelihood == "bernoulli" and model.digit_head
    assert model.anomaly_statistics == (
        "log_squared_error",
        "log_local_error",
        "reconstruction_ink",
    )
    assert config.sample_quality and config.judge_epochs is None
    assert (config.dataset, config.epochs, config.batch_size, config.lr) == (
        "mnist-5k",
        50,
        128,
        2e-3,
    )
    assert (config.kl_warmup_epochs, config.beta) == (5, 1.0)


def test_mlp_presets_are_the_classic_784_400_100_20_with_and_without_label() -> None:
    mlp = TrainConfig.from_preset("mlp").model_config()
    cvae = TrainConfig.from_preset("cvae-mlp").model_config()
    assert (mlp.architecture, mlp.hidden_dims, mlp.latent_dim, mlp.num_classes) == (
        "mlp",
        (400, 100),
        20,
        None,
    )
    assert cvae.num_classes == 10
    assert cvae.hidden_dims == mlp.hidden_dims and cvae.latent_dim == mlp.latent_dim


def test_mnist_full_is_a_larger_model_on_real_mnist_with_amp() -> None:
    config = TrainConfig.from_preset("mnist-full")
    assert config.dataset == "mnist" and config.amp
    assert config.hidden_dims > TrainConfig().hidden_dims
    assert config.latent_dim > TrainConfig().latent_dim


def test_quality_is_the_default_model_trained_longer() -> None:
    quality, default = TrainConfig.from_preset("quality"), TrainConfig()
    assert quality.model_config() == default.model_config()
    assert quality.epochs == 2 * default.epochs
    assert quality.kl_warmup_epochs / quality.epochs == default.kl_warmup_epochs / default.epochs
    assert quality.replace(epochs=50, kl_warmup_epochs=5, preset="default") == default


def test_tiny_is_short_and_cheap_to_evaluate() -> None:
    tiny, default = TrainConfig.from_preset("tiny"), TrainConfig()
    assert tiny.epochs < default.epochs and tiny.iwae_k < default.iwae_k
    assert tiny.hidden_dims < default.hidden_dims


def test_every_override_has_a_comment_saying_why() -> None:
    """Presets are data with a reason beside each override (nanoGPT's config files)."""
    source = Path(presets.__file__).read_text().splitlines()
    table = next(
        node.value
        for node in ast.walk(ast.parse("\n".join(source)))
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "PRESETS"
    )
    assert isinstance(table, ast.Dict)
    overrides = [
        key for preset in table.values if isinstance(preset, ast.Dict) for key in preset.keys
    ]
    assert len(overrides) >= 10
    for key in overrides:
        assert key is not None
        line, above = source[key.lineno - 1], source[key.lineno - 2].strip()
        assert "#" in line or above.startswith("#"), f"override without a reason: {line.strip()}"
