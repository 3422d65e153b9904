"""Encoder and decoder networks (MLP and convolutional), conditional on an optional label."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from models.config import VAEConfig


def _mlp(widths: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """x (B, 1, 28, 28) [+ one-hot (B, C)] -> mean, logvar (B, latent_dim) each."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        label_dim = config.num_classes or 0
        self.net = _mlp([config.num_pixels + label_dim, *config.hidden_dims, 2 * config.latent_dim])

    def forward(self, x: Tensor, label: Tensor | None) -> tuple[Tensor, Tensor]:
        h = x.flatten(1)  # (B, 784)
        if label is not None:
            h = torch.cat([h, label], dim=1)
        mean, logvar = self.net(h).chunk(2, dim=1)
        return mean, logvar


class MLPDecoder(nn.Module):
    """z (B, latent_dim) [+ one-hot (B, C)] -> raw pixel outputs (B, 1, 28, 28)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        label_dim = config.num_classes or 0
        widths = [config.latent_dim + label_dim, *reversed(config.hidden_dims), config.num_pixels]
        self.net = _mlp(widths)
        self.shape = (config.image_channels, config.image_size, config.image_size)

    def forward(self, z: Tensor, label: Tensor | None) -> Tensor:
        h = z if label is None else torch.cat([z, label], dim=1)
        return self.net(h).view(-1, *self.shape)


class ConvEncoder(nn.Module):
    """Two stride-2 convolutions (28 -> 14 -> 7), then a linear layer to mean and logvar.

    The one-hot label enters as constant feature planes beside the image, so the very first
    filters already know which digit they look at.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        c1, c2 = config.hidden_dims
        in_channels = config.image_channels + (config.num_classes or 0)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=4, stride=2, padding=1),  # (B, c1, 14, 14)
            nn.ReLU(),
            nn.Conv2d(c1, c2, kernel_size=4, stride=2, padding=1),  # (B, c2, 7, 7)
            nn.ReLU(),
        )
        side = config.image_size // 4
        self.head = nn.Linear(c2 * side * side, 2 * config.latent_dim)

    def forward(self, x: Tensor, label: Tensor | None) -> tuple[Tensor, Tensor]:
        if label is not None:
            planes = label[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
            x = torch.cat([x, planes], dim=1)  # (B, 1 + C, 28, 28)
        mean, logvar = self.head(self.features(x).flatten(1)).chunk(2, dim=1)
        return mean, logvar


class ResidualBlock(nn.Module):
    """x + conv3x3(relu(conv3x3(relu(x)))): more depth at one resolution, same shape out."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = x + self.body(x)
        return out


class ConvDecoder(nn.Module):
    """A linear layer to (c2, 7, 7), then two stride-2 transposed convolutions to 28 x 28.

    `decoder_blocks` residual blocks before each transposed convolution (at 7 x 7 and at
    14 x 14) give the decoder depth where strokes are drawn; 0 is the plain decoder of
    checkpoints saved before the option existed (the same layers, the same weight names).
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        c1, c2 = config.hidden_dims
        blocks = config.decoder_blocks
        self.side = config.image_size // 4
        self.c2 = c2
        self.project = nn.Linear(config.latent_dim + (config.num_classes or 0), c2 * self.side**2)
        self.upsample = nn.Sequential(
            *(ResidualBlock(c2) for _ in range(blocks)),
            nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, kernel_size=4, stride=2, padding=1),  # (B, c1, 14, 14)
            *(ResidualBlock(c1) for _ in range(blocks)),
            nn.ReLU(),
            nn.ConvTranspose2d(c1, config.image_channels, 4, stride=2, padding=1),  # (B, 1, 28, 28)
        )

    def forward(self, z: Tensor, label: Tensor | None) -> Tensor:
        h = z if label is None else torch.cat([z, label], dim=1)
        h = self.project(h).view(-1, self.c2, self.side, self.side)
        out: Tensor = self.upsample(h)
        return out


class DigitHead(nn.Module):
    """q(y | x): digit logits (B, C) and penultimate features (B, 64) of x (B, 1, 28, 28).

    The amortised label posterior of Kingma et al. 2014 (M2): one small pass names the digit
    that predict_digit would otherwise find by decoding the image under every label. Two
    stride-2 convolutions (16, 32 channels) are enough for ~96% on mnist-5k's test digits.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        assert config.num_classes is not None
        side = config.image_size // 4
        self.features = nn.Sequential(
            nn.Conv2d(config.image_channels, 16, 4, stride=2, padding=1),  # (B, 16, 14, 14)
            nn.ReLU(),
            nn.Conv2d(16, 32, 4, stride=2, padding=1),  # (B, 32, 7, 7)
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * side * side, 64),
            nn.ReLU(),
        )
        self.logits = nn.Linear(64, config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.logits(self.features(x))
        return out


def build_encoder(config: VAEConfig) -> nn.Module:
    return MLPEncoder(config) if config.architecture == "mlp" else ConvEncoder(config)


def build_decoder(config: VAEConfig) -> nn.Module:
    return MLPDecoder(config) if config.architecture == "mlp" else ConvDecoder(config)
