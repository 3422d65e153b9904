"""Tests for models/adversarial.py: the shapes of D and C, their config, gradients to the input."""

from __future__ import annotations

import pytest
import torch

from models.adversarial import Classifier, CriticConfig, Discriminator


def images(batch: int = 5) -> torch.Tensor:
    return torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def test_discriminator_gives_one_logit_and_its_features_per_image() -> None:
    torch.manual_seed(0)
    output = Discriminator(CriticConfig(channels=(8, 16), feature_dim=24))(images())
    assert output.logits.shape == (5,)
    assert output.features.shape == (5, 24)


def test_classifier_gives_a_logit_per_digit_and_its_features() -> None:
    torch.manual_seed(0)
    output = Classifier(CriticConfig(channels=(8, 16), feature_dim=24, num_classes=10))(images())
    assert output.logits.shape == (5, 10)
    assert output.features.shape == (5, 24)


def test_default_critics_are_small() -> None:
    config = CriticConfig()
    assert (config.channels, config.feature_dim, config.num_classes) == ((16, 32), 64, 10)
    parameters = sum(p.numel() for p in Discriminator(config).parameters())
    assert parameters < 200_000


def test_the_discriminator_passes_gradient_back_to_the_image() -> None:
    """The generator learns through D: every image must get a gradient, even where D is not
    firing (LeakyReLU)."""
    torch.manual_seed(0)
    x = images().requires_grad_(True)
    Discriminator(CriticConfig()).forward(x).features.sum().backward()
    assert x.grad is not None
    assert bool((x.grad.flatten(1).abs().sum(1) > 0).all())


def test_config_round_trips_through_a_dict() -> None:
    config = CriticConfig(channels=(4, 8), feature_dim=12, num_classes=3)
    assert CriticConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["channels"] == [4, 8]


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"channels": (8,)}, "channels"),
        ({"channels": (8, 0)}, "channels"),
        ({"feature_dim": 0}, "feature_dim"),
        ({"num_classes": 1}, "num_classes"),
        ({"image_size": 30}, "image_size"),
    ],
)
def test_invalid_config_names_the_field(changes: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        CriticConfig(**changes)  # type: ignore[arg-type]


def test_unknown_config_fields_are_named() -> None:
    with pytest.raises(ValueError, match="depth"):
        CriticConfig.from_dict({"depth": 3})
