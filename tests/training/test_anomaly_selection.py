"""training/anomaly_selection.py: the greedy choice of statistics, on the dev sets only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import training.anomaly_selection as selection
from models import VAE, VAEConfig, load_checkpoint
from models.config import ANOMALY_STATISTIC_NAMES, HEAD_STATISTICS
from training.data import load_dataset
from training.ood_sets import OODSet


def statistics(n: int, shift: tuple[float, float, float], seed: int) -> tuple[torch.Tensor, ...]:
    """n rows of three standard normal statistics moved by `shift`, all of group 0."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, 3, generator=g, dtype=torch.float64) + torch.tensor(shift).double()
    return rows, torch.zeros(n, dtype=torch.long)


def test_each_step_adds_the_statistic_that_helps_the_worst_and_mean_near_set_most() -> None:
    """Column 0 is noise, column 1 gives set a away, column 2 gives set b away (less well):
    column 1 first (it lifts the mean more), then column 2 (it lifts the worst set), and the
    noise column never (it improves nothing)."""
    names = ("noise", "sees-a", "sees-b")
    train, normal = statistics(2000, (0, 0, 0), 1), statistics(500, (0, 0, 0), 2)
    sets = {
        "a": ("near", statistics(300, (0, 4, 0), 3)),
        "b": ("near", statistics(300, (0, 0, 2), 4)),
        "far": ("far", statistics(300, (9, 9, 9), 5)),
    }
    path = selection.greedy_path(train, normal, sets, names, groups=1, steps=3)
    assert [step["statistics"] for step in path] == [["sees-a"], ["sees-a", "sees-b"]]
    first, second = path
    assert first["dev_auroc"]["a"] > 0.99 and first["dev_auroc"]["b"] < 0.6
    assert second["dev_auroc"]["b"] > first["dev_auroc"]["b"] + 0.2
    assert second["objective"] > first["objective"]
    # The objective is the worst near AUROC + their mean + half the worst far one (up to 0.99).
    near = [second["dev_auroc"]["a"], second["dev_auroc"]["b"]]
    far = min(second["dev_auroc"]["far"], 0.99)
    assert second["objective"] == pytest.approx(min(near) + sum(near) / 2 + 0.5 * far, abs=1e-3)


def test_a_model_without_a_digit_head_is_offered_the_statistics_it_can_compute() -> None:
    headless = VAE(VAEConfig(hidden_dims=(8, 16), latent_dim=4, digit_head=False))
    offered = selection.candidate_statistics(headless)
    assert offered == tuple(n for n in ANOMALY_STATISTIC_NAMES if n not in HEAD_STATISTICS)
    assert len(offered) == len(ANOMALY_STATISTIC_NAMES) - len(HEAD_STATISTICS) > 0


@pytest.mark.slow
def test_selection_reads_the_dev_sets_of_the_validation_digits_only(
    trained_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    val = load_dataset("mnist-5k").val
    calls: list[dict[str, Any]] = []
    real = selection.ood_sets

    def spy(images: torch.Tensor, labels: torch.Tensor, part: str, n: int = 500) -> list[OODSet]:
        calls.append({"part": part, "validation": torch.equal(images, val.images)})
        return real(images, labels, part, 60)  # type: ignore[arg-type]

    monkeypatch.setattr(selection, "ood_sets", spy)
    path = selection.select(str(trained_checkpoint), steps=2)
    assert calls == [{"part": "dev", "validation": True}]
    assert 1 <= len(path) <= 2
    # Every statistic was a candidate: the tiny model has a digit head.
    model = load_checkpoint(trained_checkpoint).model
    assert selection.candidate_statistics(model) == ANOMALY_STATISTIC_NAMES
    assert set(path[-1]["statistics"]) <= set(ANOMALY_STATISTIC_NAMES)
