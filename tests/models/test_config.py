"""VAEConfig validation and its JSON round trip."""

from __future__ import annotations

import json

import pytest

from models import VAEConfig


def test_round_trips_through_json() -> None:
    config = VAEConfig(architecture="mlp", hidden_dims=(400, 100), latent_dim=20, num_classes=None)
    again = VAEConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"architecture": "transformer"}, "architecture"),
        ({"likelihood": "poisson"}, "likelihood"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"hidden_dims": ()}, "hidden_dims"),
        ({"hidden_dims": (32, -1)}, "hidden_dims"),
        ({"hidden_dims": (8, 16, 32)}, "two stride-2"),
        ({"num_classes": 1}, "num_classes"),
        ({"decoder_blocks": -1}, "decoder_blocks"),
        ({"architecture": "mlp", "hidden_dims": (64,), "decoder_blocks": 1}, "conv architecture"),
        ({"likelihood": "gaussian", "gaussian_std": 0.0}, "gaussian_std"),
    ],
)
def test_rejects_bad_fields_with_a_message(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VAEConfig(**kwargs)  # type: ignore[arg-type]


def test_unknown_fields_are_named() -> None:
    with pytest.raises(ValueError, match="latent_size"):
        VAEConfig.from_dict({"latent_size": 3})
