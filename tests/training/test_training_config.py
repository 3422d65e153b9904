"""Tests for training/config.py (TrainConfig): presets plus overrides, validation, device choice."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from training.config import ConfigError, TrainConfig, resolve_device
from training.presets import PRESETS


def test_overrides_win_over_the_preset() -> None:
    config = TrainConfig.from_preset("tiny", epochs=2, latent_dim=3)
    assert (config.epochs, config.latent_dim) == (2, 3)
    assert config.hidden_dims == tuple(PRESETS["tiny"]["hidden_dims"])


def test_unknown_preset_lists_every_name() -> None:
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_preset("huge")
    assert "huge" in str(caught.value)
    for name in PRESETS:
        assert name in str(caught.value)


def test_unknown_setting_is_named() -> None:
    with pytest.raises(ConfigError, match="epoch_count"):
        TrainConfig.from_preset("default", epoch_count=3)


def test_model_config_follows_the_conditional_flag() -> None:
    assert TrainConfig(conditional=True).model_config().num_classes == 10
    assert TrainConfig(conditional=False).model_config().num_classes is None


def test_decoder_blocks_default_to_one_for_conv_and_none_for_the_mlp() -> None:
    assert TrainConfig().model_config().decoder_blocks == 1
    assert TrainConfig.from_preset("mnist-full").model_config().decoder_blocks == 1
    assert TrainConfig.from_preset("tiny").model_config().decoder_blocks == 0
    for preset in ("mlp", "cvae-mlp"):
        assert TrainConfig.from_preset(preset).model_config().decoder_blocks == 0
    # Changing only the architecture needs no --decoder-blocks 0.
    assert TrainConfig(architecture="mlp", hidden_dims=(64,)).decoder_blocks == 0
    assert TrainConfig(decoder_blocks=2).model_config().decoder_blocks == 2


def test_hidden_dims_from_a_list_become_a_tuple() -> None:
    assert TrainConfig(hidden_dims=[8, 16]).hidden_dims == (8, 16)  # type: ignore[arg-type]


def test_out_defaults_to_checkpoints_slash_preset() -> None:
    assert TrainConfig.from_preset("mlp").out_dir == Path("checkpoints") / "mlp"
    assert TrainConfig(out="/tmp/run").out_dir == Path("/tmp/run")


def test_to_dict_is_json_and_round_trips() -> None:
    config = TrainConfig.from_preset("tiny", hidden_dims=(4, 8))
    data = json.loads(json.dumps(config.to_dict()))
    assert data["hidden_dims"] == [4, 8]
    assert TrainConfig(**data) == config


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": -3}, "epochs"),
        ({"epochs": 2.5}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"beta": -0.1}, "beta"),
        ({"kl_warmup_epochs": -1}, "kl_warmup_epochs"),
        ({"free_bits": -0.5}, "free_bits"),
        ({"patience": -1}, "patience"),
        ({"device": "tpu"}, "device"),
        ({"seed": -1}, "seed"),
        ({"iwae_k": 0}, "iwae_k"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
        ({"anomaly_fpr": 0.0}, "anomaly_fpr"),
        ({"anomaly_fpr": 0.7}, "anomaly_fpr"),
        ({"architecture": "transformer"}, "transformer"),
        ({"likelihood": "poisson"}, "poisson"),
        ({"dataset": "cifar10"}, "cifar10"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"hidden_dims": (8,)}, "hidden_dims"),
        ({"gaussian_std": 0.1}, "gaussian"),
        ({"decoder_blocks": -1}, "decoder_blocks"),
        ({"architecture": "mlp", "hidden_dims": (64,), "decoder_blocks": 1}, "conv architecture"),
    ],
)
def test_invalid_settings_fail_with_a_message_naming_them(
    changes: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError, match=named) as caught:
        TrainConfig(**changes)
    assert "\n" not in str(caught.value)


def test_gaussian_likelihood_accepts_a_fixed_std() -> None:
    config = TrainConfig(likelihood="gaussian", gaussian_std=0.1)
    assert config.model_config().gaussian_std == 0.1


def test_auto_device_is_cpu_without_cuda() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_cuda_says_use_cpu() -> None:
    with pytest.raises(ConfigError, match="--device cpu"):
        resolve_device("cuda:0")


def test_auto_trains_on_the_cpu_on_a_gpu_the_torch_build_cannot_run(
    fake_gpu: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    fake_gpu((6, 0), name="Tesla P100")
    with caplog.at_level("WARNING", logger="training.config"):
        assert resolve_device("auto") == torch.device("cpu")
    assert "training on the CPU instead of the GPU: GPU 0 (Tesla P100" in caplog.text
    with pytest.raises(ConfigError, match=r"device 'cuda': GPU 0 .*or use --device cpu"):
        resolve_device("cuda")
    fake_gpu((9, 0))
    assert resolve_device("auto").type == resolve_device("cuda:0").type == "cuda"


def test_unknown_device_name_is_rejected() -> None:
    with pytest.raises(ConfigError, match="cuda:N"):
        resolve_device("gpu")
