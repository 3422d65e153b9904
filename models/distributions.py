"""The diagonal Gaussian posterior q(z | x) and its helpers."""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_2PI = math.log(2 * math.pi)


class DiagonalGaussian:
    """q(z | x) = N(mean, exp(logvar)); every tensor is (B, latent_dim)."""

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        self.mean = mean
        # Clamped so exp() neither overflows nor collapses to 0 on untrained weights.
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None, scale: float = 1.0) -> Tensor:
        """Reparameterised draw (differentiable in mean and logvar); scale multiplies the std."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + scale * self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl_per_dim(self) -> Tensor:
        """KL(q || N(0, I)) for each latent dimension, (B, latent_dim)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per image in nats, (B,)."""
        return self.kl_per_dim().sum(dim=-1)

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z | x) per row of z, (..., B)."""
        return -0.5 * (((z - self.mean) ** 2) / self.logvar.exp() + self.logvar + LOG_2PI).sum(-1)

    def expand(self, k: int) -> DiagonalGaussian:
        """The same posterior repeated k times along a new leading axis, (k, B, latent_dim)."""
        return DiagonalGaussian(
            self.mean.expand(k, *self.mean.shape), self.logvar.expand(k, *self.logvar.shape)
        )


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last axis."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
