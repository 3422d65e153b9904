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
import hashlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from models import VAE, CheckpointError
from training.data import Split, load_dataset, to_float

INDEX_FILE = "index.safetensors"
INDEX_FORMAT = "vae-serve-index/1"
Distance = Literal["cosine", "euclidean"]
DISTANCES: tuple[Distance, ...] = ("cosine", "euclidean")
DEFAULT_DISTANCE: Distance = "cosine"  # the better of the two on every checkpoint measured
PRECISION_K = 8  # the k of the precision recorded in the index's summary


@dataclass
class Neighbours:
    """The k nearest index rows of each query: distances and row numbers, both (Q, k), nearest
    first. A row with fewer than k candidates (too few images of its digit) is padded with
    distance inf."""

    distances: Tensor
    indices: Tensor


@dataclass
class LatentIndex:
    """Posterior means of a split, searched exactly with one matrix product.

    mu:     (N, L) float32, on the device that searches (the model's)
    labels: (N,) int64 digits, on the same device (searches within a digit use it)
    images: (N, 28, 28) uint8, kept on the CPU: only the answer's rows are ever read
    conditional: mu was encoded with each image's true label, so queries search within a digit
    """

    mu: Tensor
    labels: Tensor
    images: Tensor
    distance: Distance = DEFAULT_DISTANCE
    conditional: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # split, dataset, measured precision
    _keys: Tensor = field(init=False, repr=False)
    _key_sq_norms: Tensor = field(init=False, repr=False)
    _blocks: dict[int, tuple[Tensor, Tensor, Tensor]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = self.mu.shape[0]
        if self.mu.dim() != 2 or n == 0:
            raise ValueError(f"mu must be (N, L) with N >= 1, got {tuple(self.mu.shape)}")
        if tuple(self.labels.shape) != (n,) or tuple(self.images.shape) != (n, 28, 28):
            raise ValueError(
                f"labels must be ({n},) and images ({n}, 28, 28), got "
                f"{tuple(self.labels.shape)} and {tuple(self.images.shape)}"
            )
        if self.distance not in DISTANCES:
            raise ValueError(
                f"distance must be one of {', '.join(DISTANCES)}, not {self.distance!r}"
            )
        self.mu = self.mu.float()
        self.labels = self.labels.to(self.mu.device, torch.int64)
        self.images = self.images.to("cpu", torch.uint8)
        # Precomputed once, so a search is one (Q, L) x (L, N) product plus elementwise work.
        self._keys = F.normalize(self.mu, dim=1) if self.distance == "cosine" else self.mu
        self._key_sq_norms = self.mu.pow(2).sum(1)
        # Each digit's rows, keys and norms, contiguous: searches within a digit read only them.
        self._blocks = {}
        for digit in self.labels.unique().tolist():
            rows = (self.labels == digit).nonzero()[:, 0]
            self._blocks[digit] = (rows, self._keys[rows], self._key_sq_norms[rows])

    def __len__(self) -> int:
        return self.mu.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.mu.shape[1]

    @property
    def device(self) -> torch.device:
        return self.mu.device

    def to(self, device: torch.device | str) -> LatentIndex:
        """A copy whose searchable tensors (mu, labels) live on `device`."""
        return LatentIndex(
            self.mu.to(device),
            self.labels.to(device),
            self.images,
            self.distance,
            self.conditional,
            dict(self.info),
        )

    def search(self, query: Tensor, k: int, digits: Tensor | None = None) -> Neighbours:
        """The k nearest rows to each query latent (Q, L); with `digits` (Q,), only rows of
        that digit are candidates. Cosine distance is 1 - cos, in [0, 2]; Euclidean is the
        L2 norm of the difference."""
        if query.dim() != 2 or query.shape[1] != self.latent_dim:
            raise ValueError(f"query must be (Q, {self.latent_dim}), got {tuple(query.shape)}")
        query = query.to(self.device, torch.float32)
        k = min(k, len(self))
        if digits is None:
            return self._nearest(query, k, self._keys, self._key_sq_norms)
        # One product per digit in the batch (one for a single upload) against that digit's
        # rows only: a tenth of the work of masking the whole index, and exact all the same.
        digits = digits.to(self.device)
        found = Neighbours(
            torch.full((len(query), k), float("inf"), device=self.device),
            torch.zeros((len(query), k), dtype=torch.long, device=self.device),
        )
        for digit in digits.unique().tolist():
            block = self._blocks.get(digit)
            if block is None:
                continue  # no training image of this digit: nothing is near
            picked = (digits == digit).nonzero()[:, 0]
            rows, keys, sq_norms = block
            near = self._nearest(query[picked], min(k, len(rows)), keys, sq_norms)
            found.distances[picked, : near.indices.shape[1]] = near.distances
            found.indices[picked, : near.indices.shape[1]] = rows[near.indices]
        return found

    def _nearest(self, query: Tensor, k: int, keys: Tensor, sq_norms: Tensor) -> Neighbours:
        """Exact top-k of query (Q, L) among keys (M, L): one matrix product and a top-k, then
        distances for the k winners only."""
        if self.distance == "cosine":
            best = (F.normalize(query, dim=1) @ keys.T).topk(k, dim=1)  # cosine similarity
            return Neighbours(1.0 - best.values, best.indices)
        # |q - m|^2 - |q|^2 = |m|^2 - 2 q.m ranks rows alike, in one fused multiply-add.
        best = torch.addmm(sq_norms, query, keys.T, alpha=-2.0).topk(k, dim=1, largest=False)
        squared = best.values + query.pow(2).sum(1, keepdim=True)
        return Neighbours(squared.clamp_min(0.0).sqrt(), best.indices)

    def summary(self) -> dict[str, Any]:
        """What GET /models and config.json say about the index."""
        return {
            "file": INDEX_FILE,
            "size": len(self),
            "latent_dim": self.latent_dim,
            "distance": self.distance,
            "search": "within the query's digit" if self.conditional else "all images",
            **self.info,
        }

    # ---- persistence -----------------------------------------------------------------------

    def export(self) -> tuple[bytes, dict[str, Any]]:
        """The file's bytes and its entry for config.json (the summary plus the bytes' sha256,
        which the service checks on load)."""
        data = self.to_bytes()
        return data, {**self.summary(), "sha256": hashlib.sha256(data).hexdigest()}

    def to_bytes(self) -> bytes:
        """The index as safetensors bytes (tensors on the CPU, metadata as text)."""
        tensors = {
            "mu": self.mu.detach().cpu().contiguous(),
            "labels": self.labels.detach().cpu().contiguous(),
            "images": self.images.contiguous(),
        }
        metadata = {
            "format": INDEX_FORMAT,
            "distance": self.distance,
            "conditional": json.dumps(self.conditional),
            "info": json.dumps(self.info, allow_nan=False),
        }
        return save_safetensors(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, device: torch.device | str = "cpu") -> LatentIndex:
        """Parse `to_bytes` output; ValueError names what is wrong."""
        try:
            tensors = load_safetensors(data)
            metadata = _safetensors_metadata(data)
        except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a readable safetensors file ({exc})") from exc
        if metadata.get("format") != INDEX_FORMAT:
            raise ValueError(f"format is {metadata.get('format')!r}, expected {INDEX_FORMAT!r}")
        missing = {"mu", "labels", "images"} - set(tensors)
        if missing:
            raise ValueError(f"missing tensor(s) {', '.join(sorted(missing))}")
        try:
            return cls(
                tensors["mu"].to(device),
                tensors["labels"].to(device),
                tensors["images"],
                metadata.get("distance", DEFAULT_DISTANCE),  # type: ignore[arg-type]
                bool(json.loads(metadata.get("conditional", "false"))),
                json.loads(metadata.get("info", "{}")),
            )
        except json.JSONDecodeError as exc:
            raise ValueError(f"metadata is not valid JSON ({exc})") from exc


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob (its JSON header)."""
    header_size = int.from_bytes(data[:8], "little")
    if header_size > len(data) - 8:
        raise ValueError("truncated header")
    metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}


def load_index(
    folder: str | Path, device: torch.device | str = "cpu", expected_sha256: str | None = None
) -> LatentIndex | None:
    """The checkpoint's index, or None when it has none; CheckpointError when it is damaged."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        return None
    data = path.read_bytes()
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise CheckpointError(
            f"{path}: sha256 does not match config.json (the file is corrupt or was replaced); "
            "retrain, or delete the file to serve the model without /similar"
        )
    try:
        return LatentIndex.from_bytes(data, device)
    except ValueError as exc:
        raise CheckpointError(
            f"{path}: not a latent index ({exc}); retrain, or delete the file to serve the "
            "model without /similar"
        ) from exc


# ---- building and measuring ----------------------------------------------------------------


@torch.no_grad()
def encode_split(model: VAE, split: Split, batch_size: int = 500) -> Tensor:
    """Posterior means (N, L) of a split; conditional models encode each image with its label."""
    model.eval()
    means = []
    for images, labels in zip(
        split.images.split(batch_size), split.labels.split(batch_size), strict=True
    ):
        x = to_float(images).to(model.device)
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
    for images, labels in zip(
        queries.images.split(batch_size), queries.labels.split(batch_size), strict=True
    ):
        latents, digits = encode_queries(model, to_float(images))
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
