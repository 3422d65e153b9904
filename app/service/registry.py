"""Loading checkpoints once, onto the right device, and looking models up by name."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.errors import ModelNotFound
from app.settings import Settings, SettingsError
from models import VAE, load_checkpoint
from models.checkpoint import WEIGHTS_NAME, sha256_of
from models.device import auto_device, cuda_problem
from models.index import LatentIndex, load_index
from models.prior import PRIOR_FILE, GaussianMixturePrior, checkpoint_prior

logger = logging.getLogger("app.service.registry")
VERSION_DIGITS = 12


def resolve_device(requested: str) -> torch.device:
    """`auto` -> the first GPU when this torch build runs on it, else the CPU (the log says
    why); an explicit GPU must exist and be one the build runs on."""
    if requested == "auto":
        device, problem = auto_device()
        if problem is not None:
            logger.warning("VAE_DEVICE=auto: serving on the CPU instead of the GPU: %s", problem)
        return device
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError(
                f"VAE_DEVICE={requested} but no CUDA device is visible; use VAE_DEVICE=auto or cpu"
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise SettingsError(
                f"VAE_DEVICE={requested} but only {torch.cuda.device_count()} GPU(s) are visible"
            )
        problem = cuda_problem(index)
        if problem is not None:
            raise SettingsError(f"VAE_DEVICE={requested}: {problem}; or use VAE_DEVICE=cpu")
    return device


@dataclass
class LoadedModel:
    """One served model: the network (eval mode, on device) and its checkpoint's metadata."""

    name: str
    model: VAE
    metadata: dict[str, Any]
    path: Path
    device: torch.device
    anomaly_quantiles: torch.Tensor = field(init=False)
    index: LatentIndex | None = None  # the training split's latents, for /similar
    prior: GaussianMixturePrior | None = None  # the fitted latent prior; None = N(0, I) only

    def __post_init__(self) -> None:
        quantiles = self.metadata.get("anomaly", {}).get("quantiles") or []
        self.anomaly_quantiles = torch.tensor(quantiles, dtype=torch.float64)

    @property
    def version(self) -> str:
        """The revision of the checkpoint this is: the first 12 hex digits of its weights'
        sha256 (config.json's `weights_sha256`), the same in every worker that loads it."""
        return str(self.metadata.get("weights_sha256") or "unversioned")[:VERSION_DIGITS]

    @property
    def conditional(self) -> bool:
        return self.model.config.conditional

    @property
    def latent_dim(self) -> int:
        return self.model.config.latent_dim

    @property
    def anomaly_threshold(self) -> float | None:
        threshold = self.metadata.get("anomaly", {}).get("threshold")
        return None if threshold is None else float(threshold)

    def percentile(self, score: float) -> float | None:
        """Where score falls in the validation scores (0..100), from the saved percentiles."""
        q = self.anomaly_quantiles
        if q.numel() < 2:
            return None
        if score <= float(q[0]):
            return 0.0
        if score >= float(q[-1]):
            return 100.0
        upper = int(torch.searchsorted(q, torch.tensor(score, dtype=q.dtype), right=True))
        lo, hi = float(q[upper - 1]), float(q[upper])
        fraction = 0.0 if hi == lo else (score - lo) / (hi - lo)
        return 100.0 * (upper - 1 + fraction) / (q.numel() - 1)

    def describe(self) -> dict[str, Any]:
        """The model's card for GET /models."""
        config = self.model.config
        meta = self.metadata
        training = meta.get("training", {})
        anomaly = meta.get("anomaly", {})
        return {
            "name": self.name,
            "architecture": config.architecture,
            "conditional": config.conditional,
            "num_classes": config.num_classes,
            "latent_dim": config.latent_dim,
            "likelihood": config.likelihood,
            "device": str(self.device),
            "path": str(self.path),
            "dataset": meta.get("dataset"),
            "epochs": training.get("epochs_run", training.get("epochs")),
            "metrics": meta.get("metrics", {}),
            "anomaly": {k: v for k, v in anomaly.items() if k != "quantiles"},
            "index": None if self.index is None else self.index.summary(),
            "prior": self.describe_prior(),
            "created_at": meta.get("created_at"),
            "weights_sha256": meta.get("weights_sha256"),
            "version": self.version,
        }

    @property
    def default_prior(self) -> str:
        """What /sample draws from when the request does not say: the fitted prior if any."""
        return "standard" if self.prior is None else "fitted"

    def describe_prior(self) -> dict[str, Any]:
        fitted = None if self.prior is None else self.prior.summary()
        note = (
            "samples come from the fitted prior unless prior=standard is asked for"
            if self.prior is not None
            else "this checkpoint has no fitted prior (prior.safetensors): samples come from "
            "N(0, I); retrain it to get one"
        )
        return {
            "default": self.default_prior,
            "fitted": fitted,
            # Images are shown as sigmoid(logits / T): T < 1 draws crisper strokes (fitted at
            # training time to the real digits' pixel histogram; 1 in older checkpoints).
            "decoder_temperature": self.model.config.decoder_temperature,
            "note": note,
        }


class Registry:
    """The loaded models by name; the first configured one is the default."""

    def __init__(self, models: list[LoadedModel]) -> None:
        if not models:
            raise SettingsError("no model to serve; set VAE_CHECKPOINTS")
        self.models = {m.name: m for m in models}
        self.default = models[0].name

    def get(self, name: str | None) -> LoadedModel:
        key = self.default if name is None else name
        try:
            return self.models[key]
        except KeyError:
            raise ModelNotFound(
                f"no model named {key!r}; loaded models: {', '.join(self.models)} (GET /models)"
            ) from None

    def put(self, entry: LoadedModel) -> None:
        """Serve `entry` under its name from now on (a new model, or a new revision of one)."""
        self.models[entry.name] = entry

    def remove(self, name: str) -> LoadedModel:
        """Stop serving `name` (the default stays the default: asked for, it is then a 404)."""
        entry = self.get(name)
        del self.models[name]
        return entry

    def gpu_memory_allocated(self) -> dict[str, int]:
        """Bytes allocated now on each GPU a model is on, by device name (none on the CPU)."""
        if not torch.cuda.is_available():
            return {}
        devices = {m.device for m in self.models.values() if m.device.type == "cuda"}
        return {str(device): torch.cuda.memory_allocated(device) for device in devices}

    @classmethod
    def load(cls, settings: Settings) -> Registry:
        """Load every configured checkpoint; CheckpointError/SettingsError name the problem."""
        device = resolve_device(settings.device)
        if device.type == "cpu":
            logger.info("no GPU in use: serving on the CPU (VAE_DEVICE=%s)", settings.device)
        models: list[LoadedModel] = []
        for folder in settings.checkpoint_dirs():
            name = folder.resolve().name
            if any(m.name == name for m in models):
                raise SettingsError(
                    f"two checkpoints are named {name!r}; give checkpoint folders distinct names"
                )
            models.append(load_model(name, folder, device))
        return cls(models)


def load_model(name: str, folder: Path, device: torch.device) -> LoadedModel:
    """One checkpoint folder as a served model, with its optional index and prior;
    CheckpointError names what is wrong with it."""
    checkpoint = load_checkpoint(folder, device)
    metadata = checkpoint.metadata
    if not metadata.get("weights_sha256"):
        # An older checkpoint without the digest: its version is taken from the file itself.
        metadata["weights_sha256"] = sha256_of(Path(folder) / WEIGHTS_NAME)
    # Optional: a checkpoint without index.safetensors serves everything but /similar.
    index = load_index(folder, device, metadata.get("index", {}).get("sha256"))
    # Optional too: without prior.safetensors the model samples from N(0, I).
    prior = checkpoint_prior(checkpoint)
    entry = LoadedModel(name, checkpoint.model, metadata, folder, device, index, prior)
    logger.info("loaded model %r version %s from %s on %s", name, entry.version, folder, device)
    if prior is None:
        logger.warning(
            "model %r has no fitted prior (%s): it samples from N(0, I), prior=standard",
            name,
            PRIOR_FILE,
        )
    return entry
