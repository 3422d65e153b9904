"""Fitting the decoder temperature: how crisp the images a Bernoulli decoder shows should be.

A Bernoulli decoder's mean image sigmoid(logits) is a blur of the strokes it thinks likely:
its pixel values pile up in the middle of [0, 1], where real MNIST pixels are mostly 0 or near 1
with a thin anti-aliased edge. Showing sigmoid(logits / T) with T < 1 moves each pixel towards
the likelier end. T is chosen on the training split alone, by matching distributions rather
than any judge: the T whose reconstructions (decoded posterior means) have the 20-bin histogram
of pixel values closest (L1) to that of the training images. On mnist-5k this gives T ~ 0.5.
"""

from __future__ import annotations

import torch

from models import VAE
from training.data import Batches, Split, to_float

_BINS = 20
# Candidate temperatures: 1 (the mean image) down to 0.2 (nearly black and white).
CANDIDATES = tuple(round(1.0 / s, 4) for s in torch.linspace(1.0, 5.0, 33).tolist())


def _histogram(values: torch.Tensor) -> torch.Tensor:
    counts = torch.histc(values.float().cpu(), bins=_BINS, min=0.0, max=1.0)
    return counts / counts.sum()


@torch.no_grad()
def fit_decoder_temperature(
    model: VAE, split: Split, batch_size: int = 500
) -> tuple[float, dict[str, float]]:
    """The decoder temperature for `model` (1.0 for a Gaussian likelihood, whose output is a
    mean, not a probability), and the record for config.json: the histogram distance at T and
    at 1."""
    if model.config.likelihood != "bernoulli":
        return 1.0, {}
    model.eval()
    logits = []
    for images, labels in Batches(split, batch_size, shuffle=False):
        x = images.to(model.device)
        y = labels.to(model.device) if model.config.conditional else None
        logits.append(model.decode_raw(model.encode(x, y).mode(), y).float().cpu())
    raw = torch.cat(logits)
    target = _histogram(to_float(split.images))
    distances = {
        t: float((_histogram(torch.sigmoid(raw / t)) - target).abs().sum()) for t in CANDIDATES
    }
    best = min(distances, key=lambda t: distances[t])
    return best, {
        "histogram_l1": round(distances[best], 4),
        "histogram_l1_at_1": round(distances[1.0], 4),
    }
