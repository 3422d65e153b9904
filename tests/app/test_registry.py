"""Tests for app.service.registry: device choice, loading checkpoints, lookup, percentiles."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch

from app.errors import ModelNotFound
from app.service.registry import LoadedModel, Registry, resolve_device
from app.settings import Settings, SettingsError
from models import VAE, CheckpointError, VAEConfig


def tiny_model(conditional: bool = True) -> VAE:
    config = VAEConfig(
        architecture="mlp", hidden_dims=(8,), latent_dim=2, num_classes=10 if conditional else None
    )
    return VAE(config).eval()


def loaded(name: str = "m", metadata: dict[str, object] | None = None) -> LoadedModel:
    return LoadedModel(name, tiny_model(), metadata or {}, Path(name), torch.device("cpu"))


# ---- devices --------------------------------------------------------------------------------


def test_auto_is_the_cpu_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_is_the_gpu_when_one_is_visible(fake_gpu: Callable[..., None]) -> None:
    fake_gpu((8, 6))
    assert resolve_device("auto").type == "cuda"


def test_auto_serves_on_the_cpu_from_a_gpu_the_torch_build_cannot_run(
    fake_gpu: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    # The image's CUDA 12.8 torch on a Pascal GPU: CUDA is visible, but no kernel would run.
    fake_gpu((6, 1), name="Tesla P4")
    with caplog.at_level("WARNING", logger="app.service.registry"):
        assert resolve_device("auto") == torch.device("cpu")
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("VAE_DEVICE=auto: serving on the CPU instead of the GPU")
    assert "Tesla P4, compute capability 6.1" in line and "7.0 or newer" in line


def test_auto_serves_on_the_cpu_when_the_test_kernel_fails(
    fake_gpu: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    fake_gpu((7, 5), kernel_error="CUDA error: no kernel image is available")
    with caplog.at_level("WARNING", logger="app.service.registry"):
        assert resolve_device("auto") == torch.device("cpu")
    assert "failed a test kernel" in caplog.text


@pytest.mark.parametrize("requested", ["cuda", "cuda:0"])
def test_an_explicit_gpu_the_torch_build_cannot_run_is_a_settings_error(
    fake_gpu: Callable[..., None], requested: str
) -> None:
    fake_gpu((5, 2))
    with pytest.raises(SettingsError, match=rf"VAE_DEVICE={requested}: GPU 0 .*use VAE_DEVICE=cpu"):
        resolve_device(requested)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_auto_on_this_machine_is_the_cpu() -> None:
    assert resolve_device("auto") == torch.device("cpu")


def test_cpu_is_always_available() -> None:
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("requested", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch, requested: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SettingsError, match=f"VAE_DEVICE={requested} but no CUDA device"):
        resolve_device(requested)


def test_a_gpu_index_past_the_last_gpu_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SettingsError, match="only 2 GPU"):
        resolve_device("cuda:2")


def test_loading_with_cuda_when_unavailable_fails_before_reading_checkpoints(
    monkeypatch: pytest.MonkeyPatch, trained_checkpoint: Path
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SettingsError, match="VAE_DEVICE=auto or cpu"):
        Registry.load(Settings(checkpoints=str(trained_checkpoint), device="cuda"))


# ---- loading and lookup ---------------------------------------------------------------------


def test_load_names_models_by_folder_and_defaults_to_the_first(
    trained_checkpoint: Path, trained_unconditional_checkpoint: Path
) -> None:
    paths = f"{trained_unconditional_checkpoint},{trained_checkpoint}"
    registry = Registry.load(Settings(checkpoints=paths, device="cpu"))
    assert list(registry.models) == [
        trained_unconditional_checkpoint.name,
        trained_checkpoint.name,
    ]
    assert registry.default == trained_unconditional_checkpoint.name
    assert registry.get(None) is registry.models[trained_unconditional_checkpoint.name]
    conditional = registry.get(trained_checkpoint.name)
    assert conditional.conditional and not registry.get(None).conditional
    assert conditional.device == torch.device("cpu")
    assert not conditional.model.training  # served in eval mode
    assert conditional.anomaly_threshold is not None


def test_unknown_name_is_model_not_found(trained_checkpoint: Path) -> None:
    registry = Registry.load(Settings(checkpoints=str(trained_checkpoint), device="cpu"))
    with pytest.raises(ModelNotFound) as missing:
        registry.get("nope")
    assert missing.value.status_code == 404
    assert trained_checkpoint.name in missing.value.detail  # lists what is loaded


def test_two_checkpoints_with_the_same_folder_name_are_refused(
    tmp_path: Path, trained_checkpoint: Path
) -> None:
    first = shutil.copytree(trained_checkpoint, tmp_path / "a" / "digits")
    second = shutil.copytree(trained_checkpoint, tmp_path / "b" / "digits")
    with pytest.raises(SettingsError, match="two checkpoints are named 'digits'"):
        Registry.load(Settings(checkpoints=f"{first},{second}", device="cpu"))


def test_a_parent_folder_serves_every_checkpoint_in_it(
    named_checkpoints: dict[str, Path],
) -> None:
    parent = next(iter(named_checkpoints.values())).parent
    registry = Registry.load(Settings(checkpoints=str(parent), device="cpu"))
    assert sorted(registry.models) == sorted(named_checkpoints)


def test_a_corrupt_checkpoint_is_a_checkpoint_error(
    tmp_path: Path, trained_checkpoint: Path
) -> None:
    broken = Path(shutil.copytree(trained_checkpoint, tmp_path / "broken"))
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        Registry.load(Settings(checkpoints=str(broken), device="cpu"))


def test_an_empty_registry_is_refused() -> None:
    with pytest.raises(SettingsError, match="VAE_CHECKPOINTS"):
        Registry([])


# ---- percentiles ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "quantiles",
    [[0.0, 1.0, 2.0, 4.0], [0.5, 0.5, 1.0, 3.0, 3.0, 10.0], list(np.linspace(1, 2, 101) ** 2)],
)
def test_percentile_interpolates_between_quantiles(quantiles: list[float]) -> None:
    model = loaded(metadata={"anomaly": {"threshold": 1.0, "quantiles": quantiles}})
    levels = np.linspace(0.0, 100.0, len(quantiles))
    scores = np.linspace(min(quantiles) - 1, max(quantiles) + 1, 97)
    for score in scores:
        expected = float(np.interp(score, quantiles, levels))
        if score in quantiles:  # on a tie np.interp may pick any of the equal quantiles
            continue
        assert model.percentile(float(score)) == pytest.approx(expected), score


def test_percentile_ends_and_monotone() -> None:
    quantiles = [0.2, 0.4, 1.0, 1.5, 3.0]
    model = loaded(metadata={"anomaly": {"quantiles": quantiles}})
    assert model.percentile(-5.0) == 0.0
    assert model.percentile(quantiles[0]) == 0.0
    assert model.percentile(quantiles[-1]) == 100.0
    assert model.percentile(1e9) == 100.0
    values = [model.percentile(s) for s in np.linspace(0, 4, 200)]
    assert all(a is not None and b is not None and a <= b for a, b in pairwise(values))


def test_percentile_is_none_without_calibration_quantiles() -> None:
    assert loaded(metadata={"anomaly": {"threshold": 3.0}}).percentile(1.0) is None
    assert loaded(metadata={}).percentile(1.0) is None
    assert loaded(metadata={"anomaly": {"quantiles": [1.0]}}).percentile(1.0) is None


def test_percentile_of_the_threshold_matches_the_calibration(trained_checkpoint: Path) -> None:
    registry = Registry.load(Settings(checkpoints=str(trained_checkpoint), device="cpu"))
    model = registry.get(None)
    anomaly = model.metadata["anomaly"]
    # The threshold is the validation score at 1 - fpr: its percentile is about that.
    percentile = model.percentile(anomaly["threshold"])
    assert percentile is not None
    assert percentile == pytest.approx(100 * (1 - anomaly.get("fpr", 0.01)), abs=1.5)


def test_describe_hides_the_quantiles() -> None:
    card = loaded(metadata={"anomaly": {"threshold": 2.0, "quantiles": [0.0, 1.0]}}).describe()
    assert card["anomaly"] == {"threshold": 2.0}
    assert card["latent_dim"] == 2 and card["conditional"] is True
