"""The work the peers do per batch: exactly the project's, through the model's own methods.

Imports only `models/` (pure torch), numpy and Pillow, so that the peers' venv (made by the
system Python for PyTriton, `make peers`) needs nothing of the service.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import VAE, load_checkpoint
from models.prior import GaussianMixturePrior, checkpoint_prior


@dataclass
class PeerModel:
    """The checkpoint as the service loads it: the model, its fitted prior, its calibration."""

    model: VAE
    prior: GaussianMixturePrior
    threshold: float
    quantiles: np.ndarray  # the validation scores' percentiles, as /anomaly-score places them

    @classmethod
    def load(cls, checkpoint: Path) -> PeerModel:
        loaded = load_checkpoint(checkpoint, "cpu")
        prior = checkpoint_prior(loaded)
        if prior is None:
            raise SystemExit(f"error: {checkpoint} has no fitted prior; the peers sample from it")
        anomaly = loaded.metadata.get("anomaly", {})
        quantiles = np.asarray(anomaly.get("quantiles") or [], dtype=np.float64)
        return cls(loaded.model.eval(), prior, float(anomaly["threshold"]), quantiles)

    def candidates(self, digit: int, seed: int) -> torch.Tensor:
        """One image's candidate latents (1, R, L) from the fitted prior, as /sample draws."""
        generator = torch.Generator().manual_seed(seed)
        _, candidates = self.model.draw_from_prior(
            1, torch.tensor([digit]), 1.0, generator, self.prior
        )
        return candidates

    @torch.inference_mode()
    def sample(self, candidates: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
        """Candidates (B, R, L) and digits (B,) -> the checked images (B, 1, 28, 28)."""
        images, _ = self.model.decode_verified(candidates, digits)
        return images

    @torch.inference_mode()
    def decode(self, z: np.ndarray, digits: np.ndarray) -> np.ndarray:
        """z (B, L), digits (B,) -> images (B, 28, 28) in [0, 1]."""
        labels = torch.nn.functional.one_hot(torch.from_numpy(digits).long(), 10).float()
        return self.model.decode(torch.from_numpy(z), labels)[:, 0].numpy()

    @torch.inference_mode()
    def anomaly(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """images (B, 28, 28) -> what v2 -anomaly answers: score, is_anomaly, digit,
        digit_probability and percentile, decided as the service decides them."""
        result = self.model.anomaly_score(torch.from_numpy(images)[:, None])
        score = result.score.numpy().astype(np.float32)
        assert result.digit is not None and result.digit_probability is not None
        return {
            "score": score,
            "is_anomaly": score > self.threshold,
            "digit": result.digit.numpy().astype(np.int64),
            "digit_probability": result.digit_probability.numpy().astype(np.float32),
            "percentile": self.percentile(score),
        }

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """Where each score falls among the validation scores, 0..100 (linear between the
        saved percentiles), as the service's LoadedModel.percentile."""
        q = self.quantiles
        positions = np.interp(scores.astype(np.float64), q, np.arange(len(q)))
        return (100.0 * positions / (len(q) - 1)).astype(np.float32)


def png(image: torch.Tensor) -> bytes:
    """(1, 28, 28) in [0, 1] -> an 8-bit grayscale PNG, as the service encodes one."""
    pixels = image[0].nan_to_num(nan=0.0).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()
