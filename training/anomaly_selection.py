"""Which statistics the anomaly score compares: a greedy choice on the dev anomaly sets.

`python -m training.anomaly_selection CHECKPOINT` refits the checkpoint's anomaly reference with
every statistic models/config.py knows, then adds statistics one at a time, each time the one
that most improves the dev sets' worst near-distribution AUROC plus their mean (far sets kept at
0.99 or better), against the validation digits. It reads the dev sets only (built from the
validation split, other fonts, other seeds): the test sets the README reports stay unseen.
The preset's `anomaly_statistics` is what this printed for the default model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from models import VAE, load_checkpoint
from models.config import ANOMALY_STATISTIC_NAMES, HEAD_STATISTICS
from training.data import load_dataset, to_float
from training.evaluate import auroc
from training.ood_sets import ood_sets


@torch.no_grad()
def _statistics(model: VAE, images: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Every statistic (N, S) and the predicted digit (N,) of uint8 images."""
    results = [model.anomaly_statistics(to_float(b)) for b in images.split(batch_size)]
    digits = [
        torch.zeros(len(r.statistics), dtype=torch.long) if r.digit is None else r.digit
        for r in results
    ]
    return torch.cat([r.statistics for r in results]).double(), torch.cat(digits)


def _mahalanobis(train: tuple[Tensor, Tensor], columns: list[int], groups: int) -> Any:
    stats, digits = train
    chosen = stats[:, columns]
    centre = torch.stack(
        [
            chosen[digits == g].mean(0) if int((digits == g).sum()) >= 2 else chosen.mean(0)
            for g in range(groups)
        ]
    )
    residual = chosen - centre[digits]
    covariance = residual.T @ residual / max(len(chosen) - groups, 1)
    precision = torch.linalg.inv(covariance + 1e-4 * torch.eye(len(columns), dtype=torch.float64))

    def score(data: tuple[Tensor, Tensor]) -> Tensor:
        delta = data[0][:, columns] - centre[data[1]]
        return torch.einsum("bi,ij,bj->b", delta, precision, delta).clamp_min(0).sqrt()

    return score


Stats = tuple[Tensor, Tensor]  # statistics (N, S) and predicted digits (N,)


def greedy_path(
    train: Stats,
    normal: Stats,
    sets: Mapping[str, tuple[str, Stats]],
    names: Sequence[str],
    groups: int,
    steps: int = 6,
) -> list[dict[str, Any]]:
    """Add statistics (columns of `names`) one at a time, each time the one whose Mahalanobis
    score (fitted on `train`) most improves the worst near AUROC plus the mean near AUROC of
    `sets` (name -> (kind, statistics)) against `normal`, far sets counted up to 0.99; stop when
    nothing improves it. After each step: the statistics chosen and their AUROCs."""

    def evaluate(columns: list[int]) -> dict[str, float]:
        score = _mahalanobis(train, columns, groups)
        normal_scores = score(normal)
        return {name: auroc(normal_scores, score(data)) for name, (_, data) in sets.items()}

    def objective(aurocs: dict[str, float]) -> float:
        near = [aurocs[n] for n, (kind, _) in sets.items() if kind == "near"]
        far = [aurocs[n] for n, (kind, _) in sets.items() if kind == "far"] or [1.0]
        return min(near) + sum(near) / len(near) + 0.5 * min(min(far), 0.99)

    chosen: list[int] = []
    path: list[dict[str, Any]] = []
    best = -float("inf")
    for _ in range(steps):
        trials = {
            column: evaluate([*chosen, column])
            for column in range(len(names))
            if column not in chosen
        }
        if not trials:
            break
        column, aurocs = max(trials.items(), key=lambda item: objective(item[1]))
        if objective(aurocs) <= best + 1e-4:
            break
        best = objective(aurocs)
        chosen.append(column)
        path.append(
            {
                "statistics": [names[c] for c in chosen],
                "objective": round(best, 4),
                "dev_auroc": {name: round(value, 4) for name, value in aurocs.items()},
            }
        )
    return path


def candidate_statistics(model: VAE) -> tuple[str, ...]:
    """Every statistic the model can compute: those through the digit head need one."""
    return tuple(
        name
        for name in ANOMALY_STATISTIC_NAMES
        if model.digit_head is not None or name not in HEAD_STATISTICS
    )


def select(checkpoint: str, steps: int = 6) -> list[dict[str, Any]]:
    """The greedy path on the dev anomaly sets of a checkpoint (greedy_path)."""
    loaded = load_checkpoint(checkpoint)
    model = loaded.model
    names = candidate_statistics(model)
    model.config = replace(model.config, anomaly_statistics=names)
    data = load_dataset(loaded.metadata.get("dataset", {}).get("name", "mnist-5k"))
    sets = {
        s.name: (s.kind, _statistics(model, s.images))
        for s in ood_sets(data.val.images, data.val.labels, "dev")
    }
    return greedy_path(
        _statistics(model, data.train.images),
        _statistics(model, data.val.images),
        sets,
        names,
        model.config.num_classes or 1,
        steps,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.anomaly_selection",
        description="Choose the anomaly score's statistics greedily on the dev anomaly sets.",
    )
    parser.add_argument("checkpoint", help="checkpoint folder")
    parser.add_argument("--steps", type=int, default=6, help="most statistics to choose")
    args = parser.parse_args(argv)
    for step in select(args.checkpoint, args.steps):
        print(json.dumps(step))
    return 0


if __name__ == "__main__":
    sys.exit(main())
