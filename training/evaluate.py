"""Test-set metrics and anomaly calibration of a trained VAE, and the `training.evaluate` CLI."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from models import ANOMALY_SCORE_KIND, ANOMALY_STATISTICS, VAE, CheckpointError, load_checkpoint
from training.cliutil import OneLineErrorParser, report_error
from training.config import ConfigError, resolve_device
from training.data import DATASETS, Batches, DataError, MNISTData, Split, load_dataset, to_float

# Percentiles 0, 1, ..., 100 of normal validation scores: the service reports where a score falls.
_PERCENTILES = 101


@torch.no_grad()
def evaluate(
    model: VAE,
    data: Split,
    iwae_k: int,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Metrics of `model` on `data` (usually the test split), all per image and in nats.

    elbo / iwae_log_likelihood / iwae_nll: single-sample ELBO and the k-sample IWAE estimate of
    log p(x). For a conditional model they are given the true digit (log p(x | y)), and the
    marginal_* keys give log p(x) with the digit summed out (uniform prior), which is the number
    to compare with an unconditional model. reconstruction_mse: mean squared pixel error of the
    reconstruction decoded from the posterior mean. digit_accuracy / per_class_accuracy (list by
    digit): of predict_digit, conditional models only. Images are used as grey levels in [0, 1].
    """
    model.eval()
    conditional = model.config.conditional
    sums: dict[str, Tensor] = {}
    correct = torch.zeros(model.config.num_classes or 1, dtype=torch.long)
    totals = torch.zeros_like(correct)

    def add(name: str, values: Tensor) -> None:
        total = values.double().sum().cpu()
        sums[name] = sums[name] + total if name in sums else total

    for x, y in Batches(data, batch_size, shuffle=False):
        labels = y if conditional else None
        add("elbo", model.elbo(x, labels, k=1, generator=generator))
        add("iwae_log_likelihood", model.log_likelihood(x, labels, k=iwae_k, generator=generator))
        posterior = model.encode(x, labels)
        reconstruction = model.decode(posterior.mode(), labels)
        add("reconstruction_mse", (reconstruction - x).pow(2).flatten(1).mean(1))
        if conditional:
            add("marginal_elbo", model.elbo(x, None, k=1, generator=generator))
            add(
                "marginal_iwae_log_likelihood",
                model.log_likelihood(x, None, k=iwae_k, generator=generator),
            )
            hits = (model.predict_digit(x).digit == y).long().cpu()
            correct.index_add_(0, y.cpu(), hits)
            totals.index_add_(0, y.cpu(), torch.ones_like(hits))

    count = len(data)
    means = {name: float(total) / count for name, total in sums.items()}
    metrics: dict[str, Any] = {
        "num_images": count,
        "iwae_k": iwae_k,
        "conditional": conditional,
        "elbo": means["elbo"],
        "iwae_log_likelihood": means["iwae_log_likelihood"],
        "iwae_nll": -means["iwae_log_likelihood"],
        "reconstruction_mse": means["reconstruction_mse"],
    }
    if conditional:
        metrics |= {
            "marginal_elbo": means["marginal_elbo"],
            "marginal_iwae_log_likelihood": means["marginal_iwae_log_likelihood"],
            "marginal_iwae_nll": -means["marginal_iwae_log_likelihood"],
            "digit_accuracy": float(correct.sum()) / count,
            "per_class_accuracy": [
                float(c) / float(t) if t > 0 else None
                for c, t in zip(correct.tolist(), totals.tolist(), strict=True)
            ],
        }
    return metrics


@torch.no_grad()
def anomaly_scores(model: VAE, images: Tensor, batch_size: int = 500) -> Tensor:
    """anomaly_score of uint8 images (N, 1, 28, 28), batch by batch, as a CPU float64 (N,)."""
    model.eval()
    scores = [model.anomaly_score(to_float(batch)).score for batch in images.split(batch_size)]
    return torch.cat(scores).double().cpu()


@torch.no_grad()
def calibrate_anomaly(
    model: VAE, data: MNISTData, fpr: float, batch_size: int = 500
) -> dict[str, Any]:
    """Fit the anomaly reference on the train split, then set the threshold that flags a share
    `fpr` of the (unseen) validation split; test_fpr checks that share on the test split."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be strictly between 0 and 1, got {fpr}")
    model.eval()
    model.fit_anomaly_reference(to_float(data.train.images), batch_size=batch_size)
    validation = anomaly_scores(model, data.val.images, batch_size)
    threshold = float(torch.quantile(validation, 1.0 - fpr))
    quantiles = torch.quantile(validation, torch.linspace(0.0, 1.0, _PERCENTILES).double())
    test = anomaly_scores(model, data.test.images, batch_size)
    return {
        "score_kind": ANOMALY_SCORE_KIND,
        "statistics": list(ANOMALY_STATISTICS),
        "reference": "train split",
        "calibration": "validation split",
        "fpr": fpr,
        "threshold": threshold,
        "quantiles": [float(q) for q in quantiles],
        "validation_size": len(validation),
        "test_fpr": float((test > threshold).double().mean()),
    }


# ---- command line -------------------------------------------------------------------------------

_ROWS = (
    ("elbo", "ELBO", "nats"),
    ("iwae_log_likelihood", "IWAE log-likelihood", "nats"),
    ("iwae_nll", "IWAE NLL", "nats"),
    ("marginal_elbo", "ELBO, digit summed out", "nats"),
    ("marginal_iwae_log_likelihood", "IWAE log-likelihood, digit summed out", "nats"),
    ("marginal_iwae_nll", "IWAE NLL, digit summed out", "nats"),
    ("reconstruction_mse", "reconstruction MSE", "per pixel"),
    ("digit_accuracy", "digit accuracy", ""),
    ("anomaly_test_fpr", "anomaly flags on test digits", ""),
)


def format_table(metrics: dict[str, Any]) -> str:
    """The metrics as an aligned two-column table."""
    given = " (given the digit)" if metrics.get("conditional") else ""
    lines = [f"{metrics['num_images']} test images, IWAE with k={metrics['iwae_k']}"]
    for key, label, unit in _ROWS:
        if metrics.get(key) is None:
            continue
        value = metrics[key]
        if key in ("elbo", "iwae_log_likelihood", "iwae_nll"):
            label += given
        text = f"{value:.2%}" if key.endswith(("accuracy", "fpr")) else f"{value:.4g} {unit}"
        lines.append(f"  {label:<40} {text}")
    per_class = metrics.get("per_class_accuracy")
    if per_class:
        cells = "  ".join(f"{d}:{a:.0%}" for d, a in enumerate(per_class) if a is not None)
        lines.append(f"  {'accuracy per digit':<40} {cells}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m training.evaluate",
        description="Re-run the test-set evaluation of a trained checkpoint.",
    )
    parser.add_argument("checkpoint", help="checkpoint folder (config.json + model.safetensors)")
    parser.add_argument(
        "--dataset", choices=DATASETS, help="default: the dataset the checkpoint was trained on"
    )
    parser.add_argument("--data-dir", help="where real MNIST lives (default: as trained, or data)")
    parser.add_argument("--iwae-k", type=int, help="IWAE samples (default: as trained, or 100)")
    parser.add_argument("--batch-size", type=int, help="images per batch (default: as trained)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, help="seed of the sampling noise (default: as trained)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        metrics = _run(args)
    except (ConfigError, DataError, CheckpointError) as exc:
        return report_error(exc)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"checkpoint {args.checkpoint}")
        print(format_table(metrics))
    return 0


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if args.iwae_k is not None and args.iwae_k < 1:
        raise ConfigError(f"invalid --iwae-k {args.iwae_k}: expected a positive count, e.g. 100")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"invalid --batch-size {args.batch_size}: expected e.g. 250")
    device = resolve_device(args.device)
    checkpoint = load_checkpoint(args.checkpoint, device)
    trained = checkpoint.metadata.get("training", {}).get("config", {})
    data = load_dataset(
        args.dataset or trained.get("dataset", "mnist-5k"),
        data_dir=args.data_dir or trained.get("data_dir", "data"),
    ).to(device)
    seed = args.seed if args.seed is not None else int(trained.get("seed", 0))
    metrics = evaluate(
        checkpoint.model,
        data.test,
        iwae_k=args.iwae_k or int(trained.get("iwae_k", 100)),
        batch_size=args.batch_size or int(trained.get("eval_batch_size", 250)),
        generator=torch.Generator(device).manual_seed(seed),
    )
    threshold = checkpoint.metadata.get("anomaly", {}).get("threshold")
    if threshold is not None and bool(checkpoint.model.anomaly_fitted):
        scores = anomaly_scores(checkpoint.model, data.test.images)
        metrics["anomaly_threshold"] = float(threshold)
        metrics["anomaly_test_fpr"] = float((scores > threshold).double().mean())
    return metrics


if __name__ == "__main__":
    raise SystemExit(main())
