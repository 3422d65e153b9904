"""Prior samples of a trained VAE: the fixed-seed grid, and bulk PNG generation for augmentation."""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid, save_image

from models import VAE, Checkpoint, CheckpointError, load_checkpoint
from models.prior import PRIOR_FILE, GaussianMixturePrior, checkpoint_prior
from training.cliutil import OneLineErrorParser, report_error
from training.config import ConfigError, resolve_device

GRID_SIDE = 10  # samples.png: 10 x 10, one row per digit for conditional models


def prior_generator(model: VAE, prior: GaussianMixturePrior | None, seed: int) -> torch.Generator:
    """The seeded generator of a prior draw: a fitted prior draws on the CPU, N(0, I) on the
    model's device (as it always has, so old seeds give the same images)."""
    return torch.Generator("cpu" if prior is not None else model.device).manual_seed(seed)


@torch.no_grad()
def sample_grid(
    model: VAE,
    seed: int = 0,
    temperature: float = 1.0,
    prior: GaussianMixturePrior | None = None,
) -> Tensor:
    """A GRID_SIDE x GRID_SIDE grid of prior samples (row d = digit d when conditional), as a
    (3, H, W) image in [0, 1]; the same seed always gives the same grid."""
    generator = prior_generator(model, prior, seed)
    rows = model.config.num_classes or GRID_SIDE
    labels = None
    if model.config.conditional:
        labels = torch.arange(rows, device=model.device).repeat_interleave(GRID_SIDE)
    samples = model.sample(rows * GRID_SIDE, labels, temperature, generator, prior)
    return make_grid(samples.images.float().cpu(), nrow=GRID_SIDE, padding=2)


def png_bytes(grid: Tensor) -> bytes:
    buffer = io.BytesIO()
    save_image(grid, buffer, format="png")
    return buffer.getvalue()


def to_uint8(images: Tensor) -> Tensor:
    """(N, 1, 28, 28) in [0, 1] -> (N, 28, 28) uint8 on the CPU."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].cpu()


@torch.no_grad()
def generate(
    model: VAE,
    n: int,
    out_dir: Path,
    digit: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 500,
    grid: bool = False,
    prior: GaussianMixturePrior | None = None,
) -> list[Path]:
    """Write n prior samples as 28 x 28 8-bit grayscale PNGs plus labels.csv (file,digit) into
    out_dir; returns the image paths. A conditional model draws `digit`, or digits 0..9 in turn
    when digit is None; an unconditional one takes no digit (its labels.csv digits are empty).
    z comes from the fitted `prior` when given, else from N(0, I)."""
    classes = model.config.num_classes
    if classes is None and digit is not None:
        raise ConfigError(
            "--digit needs a conditional checkpoint, but this model is unconditional: "
            "drop --digit, or use a checkpoint trained with --conditional"
        )
    if classes is not None and digit is not None and not 0 <= digit < classes:
        raise ConfigError(f"invalid --digit {digit}: expected a digit 0..{classes - 1}")
    if n < 1 or batch_size < 1:
        raise ConfigError(f"--n ({n}) and --batch-size ({batch_size}) must be positive")
    if not temperature > 0:
        raise ConfigError(f"invalid --temperature {temperature}: expected a positive number")
    _make_writable_dir(out_dir)

    labels: Tensor | None = None
    if classes is not None:
        labels = torch.full((n,), digit) if digit is not None else torch.arange(n) % classes
    width = max(5, len(str(n - 1)))
    generator = prior_generator(model, prior, seed)
    paths: list[Path] = []
    first_images: list[Tensor] = []
    rows: list[tuple[str, str]] = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        batch_labels = None if labels is None else labels[start : start + count].to(model.device)
        images = model.sample(count, batch_labels, temperature, generator, prior).images
        if grid and sum(len(b) for b in first_images) < GRID_SIDE * GRID_SIDE:
            first_images.append(images.float().cpu())
        for offset, pixels in enumerate(to_uint8(images).numpy()):
            index = start + offset
            label = "" if labels is None else str(int(labels[index]))
            name = f"{label or 'sample'}_{index:0{width}d}.png"
            Image.fromarray(pixels).save(out_dir / name)
            paths.append(out_dir / name)
            rows.append((name, label))
    with (out_dir / "labels.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(("file", "digit"))
        writer.writerows(rows)
    if grid:
        images = torch.cat(first_images)[: GRID_SIDE * GRID_SIDE]
        (out_dir / "grid.png").write_bytes(png_bytes(make_grid(images, nrow=GRID_SIDE)))
    return paths


def chosen_prior(checkpoint: Checkpoint, name: str | None) -> GaussianMixturePrior | None:
    """The prior to sample a loaded checkpoint with: its fitted one unless `standard` is asked
    for; `fitted` from a checkpoint without one is a ConfigError."""
    fitted = checkpoint_prior(checkpoint)
    if name == "fitted" and fitted is None:
        raise ConfigError(
            f"--prior fitted: {checkpoint.path} has no fitted prior ({PRIOR_FILE}); use "
            "--prior standard, or retrain the checkpoint (training fits one at the end)"
        )
    return None if name == "standard" else fitted


def _make_writable_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create --out {path} ({exc.strerror}): choose a writable folder"
        ) from exc
    if not os.access(path, os.W_OK):
        raise ConfigError(f"--out {path} is not writable: choose a writable folder")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m training.generate",
        description="Write prior samples of a trained checkpoint as PNGs plus labels.csv.",
    )
    parser.add_argument("checkpoint", help="checkpoint folder (config.json + model.safetensors)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNGs")
    parser.add_argument("--n", type=int, default=100, help="number of images (default 100)")
    parser.add_argument(
        "--digit",
        type=int,
        help="digit to draw (conditional models); default: digits 0..9 in turn",
    )
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="prior std scale; < 1 gives cleaner digits"
    )
    parser.add_argument("--seed", type=int, default=0, help="same seed, same images")
    parser.add_argument(
        "--prior",
        choices=("fitted", "standard"),
        help="draw z from the checkpoint's fitted prior (the default when it has one) or from "
        "N(0, I)",
    )
    parser.add_argument("--batch-size", type=int, default=500, help="samples per decoder call")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--grid", action="store_true", help="also write grid.png of the first 100 images"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        checkpoint = load_checkpoint(args.checkpoint, device)
        model = checkpoint.model
        prior = chosen_prior(checkpoint, args.prior)
        paths = generate(
            model,
            n=args.n,
            out_dir=args.out,
            digit=args.digit,
            temperature=args.temperature,
            seed=args.seed,
            batch_size=args.batch_size,
            grid=args.grid,
            prior=prior,
        )
    except (ConfigError, CheckpointError) as exc:
        return report_error(exc)
    except OSError as exc:
        return report_error(ConfigError(f"cannot write into --out {args.out}: {exc.strerror}"))
    print(f"wrote {len(paths)} images and labels.csv to {args.out}", file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
