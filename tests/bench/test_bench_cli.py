"""bench/cli.py: the cached default checkpoint is reused while the preset's model is the same."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import bench.cli
import training.cli
from training.config import TrainConfig


def cache_with(tmp_path: Path, **changes: object) -> Path:
    model = replace(TrainConfig.from_preset("default").model_config(), **changes)
    folder = tmp_path / "default"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model": model.to_dict()}))
    return folder


def test_a_fitted_decoder_temperature_does_not_make_the_cache_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temperature is fitted after training: a cache that differs only there is reused."""
    cached = cache_with(tmp_path, decoder_temperature=0.53)
    monkeypatch.setattr(bench.cli, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(training.cli, "main", lambda argv: pytest.fail(f"retrained: {argv}"))
    assert bench.cli.default_checkpoint(print) == cached


def test_another_model_is_retrained_without_the_judge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_with(tmp_path, latent_dim=3)
    calls: list[list[str]] = []
    monkeypatch.setattr(bench.cli, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(training.cli, "main", lambda argv: calls.append(list(argv)) or 0)
    bench.cli.default_checkpoint(print)
    (argv,) = calls
    assert "--no-sample-quality" in argv and argv[argv.index("--out") + 1] == str(
        tmp_path / "default"
    )
