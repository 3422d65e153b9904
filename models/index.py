"""The latent index of a checkpoint: posterior means, labels and images of the training split,
searched exactly (POST /similar). training/index.py builds it and says why it searches as it does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors
from torch import Tensor

from models.artifacts import load_artifact, parse_artifact

INDEX_FILE = "index.safetensors"
INDEX_FORMAT = "vae-serve-index/1"
Distance = Literal["cosine", "euclidean"]
DISTANCES: tuple[Distance, ...] = ("cosine", "euclidean")
DEFAULT_DISTANCE: Distance = "cosine"  # the better of the two on every checkpoint measured


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
        tensors, metadata = parse_artifact(data, INDEX_FORMAT, {"mu", "labels", "images"})
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


def load_index(
    folder: str | Path, device: torch.device | str = "cpu", expected_sha256: str | None = None
) -> LatentIndex | None:
    """The checkpoint's index, or None when it has none; CheckpointError when it is damaged."""
    return load_artifact(
        Path(folder) / INDEX_FILE,
        expected_sha256,
        "retrain, or delete the file to serve the model without /similar",
        "a latent index",
        lambda data: LatentIndex.from_bytes(data, device),
    )
