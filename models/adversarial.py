"""The CVAE-GAN's critics: a discriminator D (real or generated?) and a digit classifier C."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor, nn

from models.config import config_from_dict


@dataclass(frozen=True)
class CriticConfig:
    """Architecture of D and C (one trunk, two heads); stored beside their weights."""

    # Channels of the two stride-2 convolutions (28 -> 14 -> 7): half the default VAE's. Enough
    # to tell MNIST digits apart (96% test accuracy on mnist-5k) while an adversarial step costs
    # ~2.5x a plain one on a CPU; (32, 64) critics made it ~4.5x.
    channels: tuple[int, ...] = (16, 32)
    # Width of the penultimate layer: D's features are matched by the generator, C's features
    # are a space the Frechet distance is measured in.
    feature_dim: int = 64
    # Digits C tells apart.
    num_classes: int = 10
    # Geometry of the images judged, as in VAEConfig.
    image_size: int = 28
    image_channels: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if len(self.channels) != 2 or any(c <= 0 for c in self.channels):
            raise ValueError(f"channels must be two positive counts, got {self.channels}")
        if self.feature_dim <= 0:
            raise ValueError(f"feature_dim must be positive, got {self.feature_dim}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {self.image_size}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["channels"] = list(self.channels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CriticConfig:
        return config_from_dict(cls, data)


@dataclass
class CriticOutput:
    """One pass of a critic over B images: logits (B,) for D or (B, num_classes) for C, and the
    penultimate features (B, feature_dim)."""

    logits: Tensor
    features: Tensor


class ConvTrunk(nn.Module):
    """x (B, 1, 28, 28) in [0, 1] -> features (B, feature_dim)."""

    def __init__(self, config: CriticConfig) -> None:
        super().__init__()
        c1, c2 = config.channels
        side = config.image_size // 4
        # LeakyReLU, not ReLU: a critic must pass gradients back even where it is not firing.
        self.net = nn.Sequential(
            nn.Conv2d(
                config.image_channels, c1, kernel_size=4, stride=2, padding=1
            ),  # (B, c1, 14, 14)
            nn.LeakyReLU(0.2),
            nn.Conv2d(c1, c2, kernel_size=4, stride=2, padding=1),  # (B, c2, 7, 7)
            nn.LeakyReLU(0.2),
            nn.Flatten(),  # (B, c2 * 7 * 7)
            nn.Linear(c2 * side * side, config.feature_dim),
            nn.LeakyReLU(0.2),
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


class Discriminator(nn.Module):
    """D: the logit that an image is a real digit rather than a reconstruction or a sample.
    Unconditional, as in CVAE-GAN: telling digits apart is C's job."""

    def __init__(self, config: CriticConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = ConvTrunk(config)
        self.head = nn.Linear(config.feature_dim, 1)

    def forward(self, x: Tensor) -> CriticOutput:
        features = self.trunk(x)  # (B, F)
        return CriticOutput(logits=self.head(features).squeeze(1), features=features)


class Classifier(nn.Module):
    """C: digit logits of an image; its features are also the space of the Frechet distance."""

    def __init__(self, config: CriticConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = ConvTrunk(config)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def forward(self, x: Tensor) -> CriticOutput:
        features = self.trunk(x)  # (B, F)
        return CriticOutput(logits=self.head(features), features=features)
