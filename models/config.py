"""VAEConfig: everything needed to rebuild a VAE, and nothing else."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, TypeVar

ConfigT = TypeVar("ConfigT")

Architecture = Literal["mlp", "conv"]
Likelihood = Literal["bernoulli", "gaussian"]

ARCHITECTURES: tuple[str, ...] = ("mlp", "conv")
LIKELIHOODS: tuple[str, ...] = ("bernoulli", "gaussian")
# What the anomaly score can compare (models/vae.py computes each, at the predicted digit).
ANOMALY_STATISTIC_NAMES: tuple[str, ...] = (
    "log_squared_error",  # log of the summed squared pixel error of the reconstruction
    "log_local_error",  # the same after a 3 x 3 box blur of the error: clustered misses count
    "log_kl",  # log KL(q(z | x) || N(0, I))
    "mean_logvar",  # mean posterior log-variance
    "negative_elbo",  # -ELBO at the posterior mean, in nats
    "reconstruction_ink",  # mean pixel of the reconstruction: how much digit the model sees
    "ink",  # mean pixel of the input
    # Through the digit head q(y | x) (models with one): they see shape, not pixel counts.
    "head_doubt",  # log(1 - q(y | x)) at the predicted digit y: how unsure the head is
    "head_feature_error",  # log squared distance between the head's features of x and of
    # its reconstruction: a perceptual reconstruction error (strokes, orientation)
    "reconstruction_head_doubt",  # log(1 - q(y | reconstruction)): whether what the model
    # redraws reads as the digit it was asked for
    "log_peak_local_error",  # log of the largest 5 x 5 mean squared error: one missing or
    # extra stroke, however small the rest of the error
)
# The statistics that need a digit head.
HEAD_STATISTICS: tuple[str, ...] = (
    "head_doubt",
    "head_feature_error",
    "reconstruction_head_doubt",
)


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of one VAE; written to config.json so a checkpoint rebuilds from files alone."""

    # "conv" samples sharper digits for the same parameter budget; "mlp" is the classic 784-400-100.
    architecture: Architecture = "conv"
    # MLP: widths of the hidden layers. Conv: channels of the two stride-2 convolutions.
    hidden_dims: tuple[int, ...] = (32, 64)
    # Conv only: residual blocks before each of the decoder's two upsampling steps; 0 = the
    # plain decoder (and that of checkpoints saved before this field existed).
    decoder_blocks: int = 0
    # 16 dims reconstruct MNIST well while keeping the prior easy to sample from.
    latent_dim: int = 16
    # None = unconditional; 10 = conditional on the digit (one-hot joined to input and z).
    num_classes: int | None = 10
    # bernoulli = BCE on pixel intensities; gaussian = MSE with a fixed or learned std.
    likelihood: Likelihood = "bernoulli"
    # Gaussian likelihood only: fixed pixel std, or None to learn one std shared by all pixels.
    gaussian_std: float | None = None
    # Conditional only: a small classifier q(y | x) trained beside the VAE names the digit of an
    # input in one pass (predict_digit), instead of decoding it under every label. Off in
    # checkpoints saved before it existed, which predict by the ELBO under each label.
    digit_head: bool = False
    # The statistics of an input the anomaly score compares with those of real digits
    # (models.vae.ANOMALY_STATISTIC_NAMES); the default is the set of checkpoints saved
    # before this field existed.
    anomaly_statistics: tuple[str, ...] = ("log_squared_error", "log_kl", "mean_logvar")
    # Images are shown (decode) as sigmoid(logits / decoder_temperature). A Bernoulli decoder's
    # mean image is a blur of the strokes it thinks likely; below 1 the strokes come out as crisp
    # as real digits. Fitted after training (training/sharpness.py); 1 = the mean image.
    decoder_temperature: float = 1.0
    # MNIST geometry; kept in the config so a checkpoint states what it expects.
    image_size: int = 28
    image_channels: int = 1

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}"
            )
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        object.__setattr__(self, "hidden_dims", tuple(int(h) for h in self.hidden_dims))
        object.__setattr__(self, "anomaly_statistics", tuple(self.anomaly_statistics))
        if self.digit_head and self.num_classes is None:
            raise ValueError("digit_head needs a conditional VAE (num_classes set)")
        unknown = sorted(set(self.anomaly_statistics) - set(ANOMALY_STATISTIC_NAMES))
        if unknown or not self.anomaly_statistics:
            raise ValueError(
                f"anomaly_statistics must be a non-empty subset of {ANOMALY_STATISTIC_NAMES}, "
                f"got {list(self.anomaly_statistics)}"
            )
        needs_head = sorted(set(self.anomaly_statistics) & set(HEAD_STATISTICS))
        if needs_head and not self.digit_head:
            raise ValueError(f"anomaly_statistics {needs_head} need a digit head (digit_head)")
        if not self.hidden_dims or any(h <= 0 for h in self.hidden_dims):
            raise ValueError(f"hidden_dims must be positive widths, got {self.hidden_dims}")
        if self.architecture == "conv" and len(self.hidden_dims) != 2:
            raise ValueError(
                "a conv VAE has two stride-2 convolutions: give exactly two channel counts "
                f"in hidden_dims, got {self.hidden_dims}"
            )
        if not 0 < self.decoder_temperature <= 10:
            raise ValueError(
                f"decoder_temperature must be in (0, 10], got {self.decoder_temperature}"
            )
        if self.decoder_blocks < 0:
            raise ValueError(f"decoder_blocks must be 0 or more, got {self.decoder_blocks}")
        if self.decoder_blocks and self.architecture != "conv":
            raise ValueError("decoder_blocks applies to the conv architecture only")
        if self.latent_dim <= 0:
            raise ValueError(f"latent_dim must be positive, got {self.latent_dim}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"num_classes must be None or >= 2, got {self.num_classes}")
        if self.gaussian_std is not None and not self.gaussian_std > 0:
            raise ValueError(f"gaussian_std must be positive or None, got {self.gaussian_std}")
        if self.architecture == "conv" and self.image_size % 4:
            raise ValueError(f"conv VAE needs image_size divisible by 4, got {self.image_size}")

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def num_pixels(self) -> int:
        return self.image_channels * self.image_size * self.image_size

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["hidden_dims"] = list(self.hidden_dims)
        data["anomaly_statistics"] = list(self.anomaly_statistics)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VAEConfig:
        return config_from_dict(cls, data)


def config_from_dict(cls: type[ConfigT], data: dict[str, Any]) -> ConfigT:
    """A config dataclass from its saved fields; a name it does not have is a ValueError (a
    checkpoint written by another version), not silently dropped."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}")
    return cls(**data)
