"""A latent index of the training split (posterior means, labels, images) and its exact search.

The trainer writes it into the checkpoint folder as `index.safetensors`; the service loads it
with the checkpoint and answers POST /similar from it.

Which latents are compared, and by which distance, was chosen by measurement: the mean
fraction of the 8 nearest training images that share a held-out test image's label
(precision@8 on mnist-5k's 1,000 test digits; `python -m training.index CHECKPOINT` prints it).

- Conditional models: q(z | x, y) learns to carry what the label does not (the style), so
  latents encoded under different labels live in different coordinates. Encoding each training
  image with its true label and the query with its predicted digit, then searching all images,
  finds the same slant and stroke in any digit: precision 0.40 (default preset; tiny: 0.54).
  Encoding everything with one neutral label (uniform weights) gets 0.70, the 10 per-label
  means concatenated 0.73. Searching only the training images of the query's digit (predicted,
  or given by the client) compares latents encoded under the same label, so the neighbours are
  that digit in the most similar style: precision 0.94 (tiny: 0.92), the model's digit
  accuracy, above raw-pixel search (0.88). That is what /similar does: still exact, and
  one matrix product over that digit's rows (a tenth of the index) per upload.
- Unconditional models search all images (nothing else is known): precision 0.88 for the test
  fixture's 784-256-16 MLP, 0.85 for the `mlp` preset (784-400-100-20), about what raw pixels
  get (0.88): 16 or 20 latent numbers do about as well as the 784 pixels.
- Distance: cosine beat Euclidean on both unconditional models (0.880 vs 0.873, 0.846 vs
  0.839). Within a digit both give the same labels and neighbours about equally close in
  pixels (mean squared pixel error to the query 0.054 and 0.052, default preset), so one
  metric, cosine, serves every model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models import VAE
from models.index import (
    DEFAULT_DISTANCE,
    DISTANCES,
    INDEX_FILE,
    Distance,
    LatentIndex,
    Neighbours,
    load_index,
)
from training.data import Batches, Split, load_dataset

__all__ = [  # the index itself lives in models/index.py; these names are re-exported for callers
    "INDEX_FILE",
    "LatentIndex",
    "Neighbours",
    "build_checkpoint_index",
    "build_index",
    "load_index",
]

PRECISION_K = 8  # the k of the precision recorded in the index's summary


# ---- building and measuring ----------------------------------------------------------------


@torch.no_grad()
def encode_split(model: VAE, split: Split, batch_size: int = 500) -> Tensor:
    """Posterior means (N, L) of a split; conditional models encode each image with its label."""
    model.eval()
    means = []
    for images, labels in Batches(split, batch_size, shuffle=False):
        x = images.to(model.device)
        y = labels.to(model.device) if model.config.conditional else None
        means.append(model.encode(x, y).mean.float())
    return torch.cat(means)


@torch.no_grad()
def encode_queries(
    model: VAE, x: Tensor, digits: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Query latents (Q, L) of images x (Q, 1, 28, 28), and for conditional models the digit
    each was encoded with (the given one, else the predicted one): the digit to search within."""
    model.eval()
    x = x.to(model.device)
    if not model.config.conditional:
        return model.encode(x).mean.float(), None
    if digits is None:
        digits = model.predict_digit(x).digit
    digits = digits.to(model.device)
    return model.encode(x, digits).mean.float(), digits


def build_index(
    model: VAE,
    split: Split,
    *,
    distance: Distance = DEFAULT_DISTANCE,
    batch_size: int = 500,
    info: dict[str, Any] | None = None,
) -> LatentIndex:
    """The index of `split` (normally train) on the model's device."""
    return LatentIndex(
        encode_split(model, split, batch_size),
        split.labels.to(model.device),
        split.images[:, 0].cpu(),
        distance,
        model.config.conditional,
        dict(info or {}),
    )


@torch.no_grad()
def retrieval_precision(
    model: VAE, index: LatentIndex, queries: Split, k: int = PRECISION_K, batch_size: int = 500
) -> float:
    """Mean fraction of each query's k nearest index images that share its true label."""
    hits = 0
    for images, labels in Batches(queries, batch_size, shuffle=False):
        latents, digits = encode_queries(model, images)
        found = index.search(latents, k, digits if index.conditional else None)
        neighbour_labels = index.labels[found.indices]  # (B, k)
        valid = torch.isfinite(found.distances)
        hits += int(((neighbour_labels == labels.to(index.device)[:, None]) & valid).sum())
    return hits / (len(queries) * k)


def build_checkpoint_index(
    model: VAE, train: Split, test: Split, dataset: str, batch_size: int = 500
) -> LatentIndex:
    """The index the trainer saves: the train split, with its test-split precision measured."""
    index = build_index(
        model, train, batch_size=batch_size, info={"split": "train", "dataset": dataset}
    )
    index.info[f"test_precision_at_{PRECISION_K}"] = round(
        retrieval_precision(model, index, test, PRECISION_K, batch_size), 4
    )
    return index


def time_search(
    size: int = 60_000,
    latent_dim: int = 32,
    *,
    k: int = 8,
    queries: int = 1,
    distance: Distance = DEFAULT_DISTANCE,
    within_digit: bool = True,
    device: torch.device | str = "cpu",
    repeats: int = 50,
    seed: int = 0,
) -> float:
    """Median seconds of one exact search of `queries` random latents in a random index of
    `size` x `latent_dim` (the full-MNIST scale by default), on `device`; `within_digit`
    restricts each query to one digit, as /similar does for conditional models."""
    generator = torch.Generator().manual_seed(seed)
    index = LatentIndex(
        torch.randn(size, latent_dim, generator=generator).to(device),
        torch.randint(0, 10, (size,), generator=generator).to(device),
        torch.zeros(size, 28, 28, dtype=torch.uint8),
        distance,
    )
    query = torch.randn(queries, latent_dim, generator=generator).to(device)
    digits = torch.randint(0, 10, (queries,), generator=generator).to(device)
    cuda = torch.device(device).type == "cuda"
    times = []
    with torch.inference_mode():
        for attempt in range(repeats + 3):  # the first few warm caches and kernels up
            if cuda:
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            index.search(query, k, digits if within_digit else None).indices.cpu()
            if cuda:
                torch.cuda.synchronize(device)
            if attempt >= 3:
                times.append(time.perf_counter() - started)
    return statistics.median(times)


def write_index(checkpoint: Path, batch_size: int = 500) -> dict[str, Any]:
    """Add (or rebuild) the index of an existing checkpoint, for one saved before indexes
    existed: writes index.safetensors and its entry in config.json; the weights are untouched."""
    from models import load_checkpoint

    loaded = load_checkpoint(checkpoint, "cpu")
    dataset = loaded.metadata.get("dataset", {}).get("name", "mnist-5k")
    data = load_dataset(dataset)
    index = build_checkpoint_index(loaded.model, data.train, data.test, dataset, batch_size)
    blob, card = index.export()
    _replace_file(checkpoint / INDEX_FILE, blob)
    metadata = {**loaded.metadata, "index": card}
    _replace_file(checkpoint / "config.json", (json.dumps(metadata, indent=2) + "\n").encode())
    return card


def _replace_file(path: Path, data: bytes) -> None:
    """Write beside, then rename over: a reader sees the old file or the new one."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_bytes(data)
    staging.replace(path)


def compare(checkpoint: Path, k: int = PRECISION_K) -> list[dict[str, Any]]:
    """Test-split precision@k of each way to search a checkpoint's latents (the table behind
    the choices in this module's docstring)."""
    from models import load_checkpoint

    loaded = load_checkpoint(checkpoint, "cpu")
    model = loaded.model
    data = load_dataset(loaded.metadata.get("dataset", {}).get("name", "mnist-5k"))
    rows = []
    for distance in DISTANCES:
        index = build_index(model, data.train, distance=distance)
        rows.append(
            {
                "search": "within digit" if index.conditional else "all images",
                "distance": distance,
                f"precision_at_{k}": round(retrieval_precision(model, index, data.test, k), 4),
            }
        )
        if index.conditional:
            index.conditional = False  # the same latents, searched across all digits
            rows.append(
                {
                    "search": "all images",
                    "distance": distance,
                    f"precision_at_{k}": round(retrieval_precision(model, index, data.test, k), 4),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.index",
        description="Measure latent search: retrieval precision of a checkpoint's index "
        "variants, and the time of one exact search at full-MNIST scale.",
    )
    parser.add_argument("checkpoint", nargs="?", help="checkpoint folder to measure precision on")
    parser.add_argument(
        "--write",
        action="store_true",
        help="also write the checkpoint's index (for one saved before indexes existed)",
    )
    parser.add_argument("--size", type=int, default=60_000, help="index rows for the timing")
    parser.add_argument("--latent-dim", type=int, default=32, help="latent size for the timing")
    parser.add_argument("--device", default="cpu", help="device for the timing")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.write and not args.checkpoint:
        parser.error("--write needs a checkpoint folder")
    if args.checkpoint and args.write:
        print(json.dumps(write_index(Path(args.checkpoint))))
    if args.checkpoint:
        for row in compare(Path(args.checkpoint)):
            print(json.dumps(row))
    for within_digit in (True, False):
        seconds = time_search(
            args.size, args.latent_dim, within_digit=within_digit, device=args.device
        )
        print(
            json.dumps(
                {
                    "search": f"{args.size} x {args.latent_dim}, k=8, 1 query, "
                    + ("within a digit" if within_digit else "all images"),
                    "device": args.device,
                    "threads": torch.get_num_threads(),
                    "median_ms": round(seconds * 1000, 3),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
