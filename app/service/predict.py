"""The predict stage: a served model's operations on decoded inputs, through its micro-batcher.

Randomness is drawn here, on the CPU, from a generator seeded per request, so a response is
reproducible from its seed whatever else is in the batch.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from app.errors import BadRequest, InvalidInput
from app.metrics import Metrics
from app.service.batching import MicroBatcher
from app.service.faults import FAULT_INPUT, requested_fault
from app.service.inference import NO_DIGIT, one_hot
from app.service.registry import LoadedModel
from app.service.work_log import current_work
from models import VAE
from models.index import LatentIndex
from models.prior import GaussianMixturePrior

MAX_DRAWN_SEED = 2**53 - 1  # drawn seeds stay exact in JavaScript numbers
PriorName = Literal["fitted", "standard"]
# The digit of a request: one for every image, one per image (the v2 API), or None (the
# model predicts or draws it).
Digits = int | Sequence[int] | None
# Images (N, 1, 28, 28) in [0, 1] and latents (N, L) come as tensors or, from protocol
# adapters that hold numpy arrays (v2), as float32 arrays: the service converts, not the caller.
ImageBatch = Tensor | np.ndarray
Latents = Tensor | np.ndarray


def draw_seed() -> int:
    return secrets.randbelow(MAX_DRAWN_SEED + 1)


@dataclass
class Generated:
    """Decoded images (N, 1, 28, 28) with the digit of each (None when unconditional)."""

    images: Tensor
    digits: list[int] | None
    latents: Tensor
    prior: PriorName | None = None  # where the latents came from, when drawn from a prior


@dataclass
class Scored:
    """Anomaly scores of N images, decided: each over `threshold` or not, placed among the
    validation scores (`percentile`, None without saved percentiles), with the digit the
    model read (None when unconditional), the score's statistics (N, S) by name and the
    per-pixel error maps (N, 1, 28, 28)."""

    scores: list[float]
    threshold: float
    is_anomaly: list[bool]
    percentile: list[float | None]
    digits: list[int] | None
    digit_probability: list[float] | None
    statistics: Tensor
    statistic_names: tuple[str, ...]
    error_map: Tensor
    score_kind: str


@dataclass(frozen=True)
class Neighbour:
    """A training image found near a query: its index in the latent index, its distance from
    the query and its label."""

    index: int
    distance: float
    label: int


@dataclass
class Neighbours:
    """Per query, its neighbours nearest first; the digit searched within and its probability
    (None when unconditional); the index's distance and search kind."""

    rows: list[list[Neighbour]]
    digits: list[int] | None
    digit_probability: list[float] | None
    distance: str
    search: str


@dataclass
class Endpoint:
    """One end of an interpolation: a latent, an image, or just a digit (z from the prior)."""

    z: Sequence[float] | None = None
    image: Tensor | None = None
    digit: int | None = None


class ModelHandle:
    """What the routes call: one loaded model and its batcher."""

    def __init__(
        self, entry: LoadedModel, batcher: MicroBatcher, metrics: Metrics | None = None
    ) -> None:
        self.entry = entry
        self.batcher = batcher
        self.metrics = metrics

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def version(self) -> str:
        """Which revision of the model answers (`LoadedModel.version`)."""
        return self.entry.version

    @property
    def num_classes(self) -> int | None:
        return self.entry.model.config.num_classes

    def check_digit(self, digit: Digits, what: str = "digit") -> None:
        """400 when a digit does not fit the model: unconditional, or out of range."""
        if digit is None:
            return
        if self.num_classes is None:
            raise BadRequest(
                f"model {self.name!r} is unconditional: it takes no {what}; omit it, or use a "
                "conditional model (GET /models)"
            )
        for value in [digit] if isinstance(digit, int) else digit:
            if not 0 <= value < self.num_classes:
                raise BadRequest(f"{what} must be in 0..{self.num_classes - 1}, got {value}")

    @staticmethod
    def _digit_column(digit: int | Sequence[int], n: int) -> Tensor:
        """The digit of each of n rows."""
        if isinstance(digit, int):
            return torch.full((n,), digit, dtype=torch.long)
        if len(digit) != n:
            raise BadRequest(f"{len(digit)} digits were given for {n} images; give one per image")
        return torch.tensor(list(digit), dtype=torch.long)

    def _labels(self, digits: Tensor) -> dict[str, Tensor]:
        return {} if self.num_classes is None else {"labels": one_hot(digits, self.num_classes)}

    def _digit_input(self, digit: Digits, n: int) -> dict[str, Tensor]:
        if self.num_classes is None:
            return {}
        return {"digit": self._digit_column(NO_DIGIT if digit is None else digit, n)}

    async def _submit(self, op: str, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        rows = next(iter(inputs.values())).shape[0]
        work = current_work.get()
        if work is not None:
            work.job(self.name, self.version, rows)
        fault = requested_fault.get()
        if fault is not None:
            # Test hooks are on: every job carries a fault column, so all still batch together.
            inputs = {**inputs, FAULT_INPUT: torch.full((rows,), fault)}
        return await self.batcher.submit(op, inputs)

    async def decode(self, z: Tensor, labels: Tensor | None) -> Tensor:
        """z (N, L) and one-hot/blended labels (N, C) or None -> images (N, 1, 28, 28)."""
        inputs = {"z": z} if labels is None else {"z": z, "labels": labels}
        return (await self._submit("decode", inputs))["images"]

    async def decode_latents(self, z: Latents, digits: Sequence[int] | None) -> Tensor:
        """z (N, L) and, for a conditional model, each row's digit (checked by the caller)
        -> images (N, 1, 28, 28)."""
        latents = torch.as_tensor(z, dtype=torch.float32)
        if digits is None or self.num_classes is None:
            return await self.decode(latents, None)
        return await self.decode(latents, one_hot(torch.tensor(list(digits)), self.num_classes))

    async def decode_rows(
        self, z: Sequence[Sequence[float]], digit: int | Sequence[int] | None
    ) -> tuple[Tensor, list[int] | None]:
        """Rows of latent_dim values and their digit (one for all, one per row; required by
        conditional models, refused by others) -> images (N, 1, 28, 28) and each row's digit."""
        latent_dim = self.entry.latent_dim
        for index, row in enumerate(z):
            if len(row) != latent_dim:
                raise InvalidInput(
                    f"z[{index}] has {len(row)} values; model {self.name!r} has latent_dim "
                    f"{latent_dim}"
                )
        if self.num_classes is None:
            if digit is not None:
                self.check_digit(0)  # raises: this model takes no digit
            return await self.decode(torch.tensor(z, dtype=torch.float32), None), None
        if digit is None:
            raise BadRequest(f"model {self.name!r} is conditional: give 'digit' (0..9)")
        digits = [digit] * len(z) if isinstance(digit, int) else list(digit)
        if len(digits) != len(z):
            raise InvalidInput(f"'digit' has {len(digits)} entries for {len(z)} rows of z")
        for value in digits:
            self.check_digit(value)
        labels = one_hot(torch.tensor(digits), self.num_classes)
        return await self.decode(torch.tensor(z, dtype=torch.float32), labels), digits

    def prior(self, name: PriorName | None) -> tuple[PriorName, GaussianMixturePrior | None]:
        """The prior a request samples from: the fitted one unless `standard` is asked for (or
        the checkpoint has none); asking for `fitted` from a model without one is a 400."""
        fitted = self.entry.prior
        if name == "standard" or (name is None and fitted is None):
            return "standard", None
        if fitted is None:
            raise BadRequest(
                f"model {self.name!r} has no fitted prior (its checkpoint holds no "
                "prior.safetensors): use prior=standard, or retrain it with vae-train, which "
                "fits one at the end of training; GET /models shows each model's prior"
            )
        return "fitted", fitted

    async def sample(
        self,
        n: int,
        digit: Digits,
        temperature: float,
        seed: int,
        prior: PriorName | None = None,
    ) -> Generated:
        """n draws from the fitted prior (per digit) or N(0, I), decoded. Digits given, one for
        all or one per image, draw the same as each other (no draw is spent on them)."""
        self.check_digit(digit)
        name, fitted = self.prior(prior)
        generator = torch.Generator().manual_seed(seed)
        classes = self.num_classes
        digits = None
        if fitted is None:
            # The draw order (z, then random digits) is the one seeds have always reproduced.
            z = temperature * torch.randn(n, self.entry.latent_dim, generator=generator)
            if classes is not None:
                digits = self._digits(n, digit, generator)
        else:
            given = None if digit is None or classes is None else self._digit_column(digit, n)
            # The same draws as VAE.sample with this prior and seed: digits, then candidates.
            digits, candidates = self.entry.model.draw_from_prior(
                n, given, temperature, generator, fitted
            )
            if digits is not None:
                out = await self._submit("sample", {"candidates": candidates, "digit": digits})
                return Generated(out["images"], digits.tolist(), out["z"], name)
            z = candidates[:, 0]
        labels = None if digits is None else one_hot(digits, classes or 0)
        images = await self.decode(z, labels)
        return Generated(images, None if digits is None else digits.tolist(), z, name)

    def _digits(self, n: int, digit: Digits, generator: torch.Generator) -> Tensor:
        if digit is not None:
            return self._digit_column(digit, n)
        return torch.randint(0, self.num_classes or 0, (n,), generator=generator)

    async def encode(self, x: ImageBatch, digit: Digits) -> dict[str, Tensor]:
        """mu, logvar (N, L) and, for conditional models, the digit used and its probability."""
        self.check_digit(digit)
        x = torch.as_tensor(x)
        return await self._submit("encode", {"x": x, **self._digit_input(digit, len(x))})

    async def reconstruct(self, x: Tensor, digit: int | None) -> tuple[Tensor, Tensor]:
        self.check_digit(digit)
        out = await self._submit("reconstruct", {"x": x, **self._digit_input(digit, len(x))})
        return out["images"], out["error"]

    async def variations(
        self, x: Tensor, n: int, scale: float, seed: int, digit: int | None
    ) -> Generated:
        """n draws of q(z | x) with the std multiplied by scale, decoded."""
        encoded = await self.encode(x, digit)
        generator = torch.Generator().manual_seed(seed)
        std = torch.exp(0.5 * encoded["logvar"][0])
        z = encoded["mu"][0] + scale * std * torch.randn(
            n, self.entry.latent_dim, generator=generator
        )
        digits = None
        if "digit" in encoded:
            digits = encoded["digit"].expand(n)
        images = await self.decode(z, None if digits is None else self._labels(digits)["labels"])
        return Generated(images, None if digits is None else digits.tolist(), z)

    async def interpolate(
        self,
        start: Endpoint,
        end: Endpoint,
        steps: int,
        method: Literal["slerp", "linear"],
        seed: int,
        prior: PriorName | None = None,
    ) -> Generated:
        """Frames from start to end; for conditional models the label blends from a to b too.
        Digit-only ends share one noise vector (the same style), placed by the prior."""
        name, fitted = self.prior(prior)
        generator = torch.Generator().manual_seed(seed)
        shared_noise = torch.randn(self.entry.latent_dim, generator=generator)

        def from_prior(digit: int) -> Tensor:
            if fitted is None:
                return shared_noise
            return fitted.sample(torch.tensor([digit]), 1.0, generator, shared_noise[None])[0]

        z0, d0 = await self._resolve(start, from_prior)
        z1, d1 = await self._resolve(end, from_prior)
        latents = VAE.interpolate(z0, z1, steps, method)
        labels = None
        digits: list[int] | None = None
        if self.num_classes is not None:
            assert d0 is not None and d1 is not None
            t = torch.linspace(0.0, 1.0, steps)[:, None]
            pair = one_hot(torch.tensor([d0, d1]), self.num_classes)
            labels = (1 - t) * pair[0] + t * pair[1]
            digits = labels.argmax(1).tolist()
        images = await self.decode(latents, labels)
        return Generated(images, digits, latents, name)

    async def _resolve(
        self, endpoint: Endpoint, from_prior: Callable[[int], Tensor]
    ) -> tuple[Tensor, int | None]:
        self.check_digit(endpoint.digit)
        if endpoint.image is not None:
            encoded = await self.encode(endpoint.image[None], endpoint.digit)
            digit = int(encoded["digit"][0]) if "digit" in encoded else None
            return encoded["mu"][0], digit
        if endpoint.z is not None:
            if len(endpoint.z) != self.entry.latent_dim:
                # A wrong shape is a validation error (422), as in /decode.
                raise InvalidInput(
                    f"z has {len(endpoint.z)} values; model {self.name!r} has latent_dim "
                    f"{self.entry.latent_dim}"
                )
            if self.num_classes is not None and endpoint.digit is None:
                raise BadRequest(
                    f"model {self.name!r} is conditional: give a 'digit' with each 'z' endpoint"
                )
            return torch.tensor(endpoint.z, dtype=torch.float32), endpoint.digit
        if endpoint.digit is None:
            raise BadRequest("an endpoint needs 'z', 'image' or 'digit'")
        if self.num_classes is None:
            raise BadRequest(
                f"model {self.name!r} is unconditional: give endpoints as 'z' or 'image'"
            )
        return from_prior(endpoint.digit), endpoint.digit

    def latent_index(self) -> LatentIndex:
        """The model's index of its training images, or a 400 that says how to get one."""
        if self.entry.index is None:
            raise BadRequest(
                f"model {self.name!r} has no latent index (index.safetensors): this checkpoint "
                "was saved without one; retrain it with vae-train, which writes the index at "
                "the end of training, or add one to it with `python -m training.index --write "
                f"{self.entry.path}` and restart; GET /models shows which models have one"
            )
        return self.entry.index

    async def similar(self, x: Tensor, k: int, digit: int | None) -> Neighbours:
        """The k training images nearest to each of x (N, 1, 28, 28), nearest first (fewer
        where a digit has fewer than k), and for conditional models the digit searched within
        and its probability."""
        index = self.latent_index()
        self.check_digit(digit)
        inputs = {"x": x, "k": torch.full((len(x),), k, dtype=torch.long)}
        found = await self._submit("similar", {**inputs, **self._digit_input(digit, len(x))})
        indices, distances = found["indices"][:, :k], found["distances"][:, :k]
        labels = index.labels[indices.to(index.device)].cpu()
        # A digit with fewer than k training images pads its row with inf: not neighbours.
        rows = [
            [Neighbour(i, d, y) for i, d, y in zip(*row, strict=True) if math.isfinite(d)]
            for row in zip(indices.tolist(), distances.tolist(), labels.tolist(), strict=True)
        ]
        conditional = "digit" in found
        return Neighbours(
            rows=rows,
            digits=found["digit"].tolist() if conditional else None,
            digit_probability=found["digit_probability"].tolist() if conditional else None,
            distance=index.distance,
            search=index.summary()["search"],
        )

    def training_image(self, index: int) -> Tensor:
        """Image `index` of the latent index's training images, (1, 28, 28) in [0, 1]."""
        return self.latent_index().images[index].float().cpu().div(255.0)[None]

    def check_anomaly(self) -> float:
        """The calibrated threshold, or a 400 for a model without an anomaly calibration."""
        threshold = self.entry.anomaly_threshold
        if not bool(self.entry.model.anomaly_fitted) or threshold is None:
            raise BadRequest(
                f"model {self.name!r} has no anomaly calibration; retrain it with vae-train "
                "(which calibrates at the end) or use another model"
            )
        return threshold

    async def anomaly(self, x: ImageBatch, threshold: float | None = None) -> Scored:
        """Score x (N, 1, 28, 28) and decide each against `threshold` (default: the
        checkpoint's calibrated one); every score is observed once in vae_anomaly_score."""
        calibrated = self.check_anomaly()
        limit = calibrated if threshold is None else threshold
        out = await self._submit("anomaly", {"x": torch.as_tensor(x)})
        scores = out["score"].tolist()
        if self.metrics is not None:
            histogram = self.metrics.anomaly_score.labels(self.name)
            for score in scores:
                histogram.observe(score)
        entry = self.entry
        conditional = "digit" in out
        return Scored(
            scores=scores,
            threshold=limit,
            is_anomaly=[score > limit for score in scores],
            percentile=[entry.percentile(score) for score in scores],
            digits=out["digit"].tolist() if conditional else None,
            digit_probability=out["digit_probability"].tolist() if conditional else None,
            statistics=out["statistics"],
            statistic_names=tuple(entry.model.config.anomaly_statistics),
            error_map=out["error_map"],
            score_kind=str(entry.metadata.get("anomaly", {}).get("score_kind", "unknown")),
        )
